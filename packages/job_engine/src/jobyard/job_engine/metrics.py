"""Prometheus metrics of jobs, shared by dispatchers and workers of both engines.

Worker processes write to PROMETHEUS_MULTIPROC_DIR (set by `jobyard worker` for its children),
so one endpoint serves every process and no two processes fight over a port.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Histogram, values

_pid = os.getpid()


def _process_id() -> int:
    """os.getpid, read once per process (and again in a forked child). A multiprocess value
    asks for its process's id on every update, to notice a fork, and getpid is a system call:
    with a job's four metric updates, about 8% of a busy worker's CPU (py-spy --gil, 4 x 8
    no-op jobs)."""
    return _pid


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
if getattr(values.ValueClass, "_multiprocess", False):  # PROMETHEUS_MULTIPROC_DIR is set
    # Before any metric has a value: values are made when a metric's labels are first used.
    values.ValueClass = values.MultiProcessValue(process_identifier=_process_id)  # type: ignore[no-untyped-call]

JOBS = Counter(
    "jobyard_jobs_total",
    "Jobs that reached a final state",
    ["name", "queue", "engine", "outcome"],
)
DURATION = Histogram(
    "jobyard_job_duration_seconds",
    "Time from a job's first start to its final state",
    ["name", "queue", "engine"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 3600),
)
RETRIES = Counter(
    "jobyard_job_retries_total", "Failed attempts that were retried", ["name", "queue", "engine"]
)
DEAD_LETTERS = Counter(
    "jobyard_dead_letters_total", "Jobs that exhausted their retries", ["name", "queue", "engine"]
)
DISPATCHED = Counter("jobyard_dispatched_total", "Jobs dispatched", ["name", "queue", "engine"])
FALLBACKS = Counter(
    "jobyard_fallbacks_total", "Jobs sent to Temporal instead of Dramatiq", ["reason"]
)
SCHEDULE_FIRES = Counter(
    "jobyard_schedule_fires_total",
    "Schedule ticks by outcome: fired, skipped_overlap, skipped_catchup, failed",
    ["schedule", "outcome"],
)
SCHEDULE_TICK_LAG = Histogram(
    "jobyard_schedule_tick_lag_seconds",
    "Time from a tick's scheduled time to the start of its job (from the job log)",
    ["schedule"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

"""Jobs of the priority tests (tests/test_priorities.py), on their own queue run one at a time,
so that the order in which they start is the order the queue gave them out. Loaded through
JOBYARD_JOB_MODULES=tests.jobs,tests.priority_jobs."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from jobyard.job_engine import JobContext, RetryPolicy, job, queue

PRIORITY_QUEUE = "prio"
#: One job at a time; each fetch takes up to 20 messages into the worker's cache, so that a
#: priority that had to wait for the cache would wait behind up to 20 jobs.
queue(PRIORITY_QUEUE, concurrency=1, prefetch_factor=20, time_limit=120)


class MarkPayload(BaseModel):
    marker_dir: str
    label: str
    seconds: float = 0.0  # how long each run takes
    block_once: float = 0.0  # how long the first run of this label blocks (a run to kill)


def record_start(directory: str, label: str) -> None:
    with (Path(directory) / "starts").open("a") as f:  # one short append: atomic
        f.write(label + "\n")


async def mark(payload: MarkPayload) -> str:
    record_start(payload.marker_dir, payload.label)
    blocked = Path(payload.marker_dir) / f"blocked-{payload.label}"
    if payload.block_once and not blocked.exists():
        blocked.touch()
        time.sleep(payload.block_once)  # holds the queue's only slot, as a long job does
    if payload.seconds:
        time.sleep(payload.seconds)
    return payload.label


@job("test.prio_mark", queue=PRIORITY_QUEUE, payload=MarkPayload, retry=RetryPolicy(attempts=3))
async def prio_mark(ctx: JobContext, payload: MarkPayload) -> str:
    """Records its start (its label, one line of `starts`) before anything else."""
    return await mark(payload)


@job(
    "test.prio_declared",
    queue=PRIORITY_QUEUE,
    payload=MarkPayload,
    retry=RetryPolicy(attempts=3),
    priority=50,
)
async def prio_declared(ctx: JobContext, payload: MarkPayload) -> str:
    """`test.prio_mark` with a declared priority of 50."""
    return await mark(payload)

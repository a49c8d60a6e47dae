"""Seeing and steering jobs on either engine: cancel, replay, list, queue and worker stats.

(Being implemented; signatures are fixed.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from jobyard.dispatcher.models import JobHandle, JobStatus


@dataclass(frozen=True)
class JobRecord:
    """A row of the job log: a job's whole life, whichever engine ran it."""

    job_id: str
    name: str
    queue: str | None
    engine: str | None
    state: str
    attempts: int
    payload: Any = None
    result: Any = None
    error_class: str | None = None
    error_message: str | None = None
    error_traceback: str | None = None
    fallback_reason: str | None = None
    progress: Any = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("enqueued_at", "started_at", "finished_at"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        return data


@dataclass(frozen=True)
class QueueStats:
    name: str
    depth: int  # waiting to run
    in_flight: int  # fetched by a worker, not finished
    delayed: int  # waiting for a retry backoff, a durable sleep or a dispatch delay
    dead: int  # dead letters (from the job log)
    live_workers: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str  # host:pid:random
    queues: list[str]
    last_seen: float  # unix seconds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cancel_job(job_id: str) -> JobStatus:
    """Cancel a job: a queued job never starts; a running one stops at its next step boundary
    (Dramatiq) or is cancelled (Temporal). Returns the status after the request."""
    raise NotImplementedError


def replay_job(job_id: str) -> JobHandle:
    """Run a dead, failed or cancelled job again with the same id and payload, keeping the
    results of the steps it finished. Raises JobStillActiveError for a queued or running job."""
    raise NotImplementedError


def list_jobs(
    *,
    state: str | None = None,
    name: str | None = None,
    queue: str | None = None,
    engine: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[JobRecord]:
    """Most recently enqueued first, from the job log."""
    raise NotImplementedError


def get_job_record(job_id: str) -> JobRecord | None:
    raise NotImplementedError


def get_job_steps(job_id: str) -> dict[str, Any]:
    """Finished steps and their recorded results (Dramatiq; Temporal keeps them in its history)."""
    raise NotImplementedError


def queue_stats() -> list[QueueStats]:
    raise NotImplementedError


def list_workers() -> list[WorkerInfo]:
    raise NotImplementedError

"""Seeing and steering jobs on either engine: cancel, replay, list, queue and worker stats."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import func, select

from jobyard.dispatcher.dispatch import get_dispatcher, get_job
from jobyard.dispatcher.engines import CancelStatus, Engine, ReplayStatus, WorkerInfo
from jobyard.dispatcher.errors import EngineUnavailable, JobNotFoundError, JobStillActiveError
from jobyard.dispatcher.models import JobHandle, JobStatus
from jobyard.job_engine import JobyardError, UnknownJobError, get_spec
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import JobLog
from jobyard.job_engine.lifecycle import dispatched_event, job_event

__all__ = [
    "JobRecord",
    "QueueStats",
    "WorkerInfo",
    "cancel_job",
    "get_job_record",
    "get_job_steps",
    "job_log_backlog",
    "list_jobs",
    "list_workers",
    "queue_stats",
    "replay_job",
]

T = TypeVar("T")
MAX_LIST = 500


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
    run_at: datetime | None = None

    @classmethod
    def from_row(cls, row: JobLog) -> JobRecord:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("enqueued_at", "started_at", "finished_at", "run_at"):
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


def _ask(call: Callable[..., T], *args: Any) -> T:
    """A call to an engine; Redis failing trips the dispatcher's breaker on the way out."""
    try:
        return call(*args)
    except EngineUnavailable as exc:
        if exc.engine == "dramatiq":
            get_dispatcher().breaker.trip(exc.reason)
        raise


def _not_found(job_id: str) -> JobyardError:
    """While Redis is unreachable a job Temporal does not know may still be Dramatiq's."""
    if get_dispatcher().breaker.is_open:
        return EngineUnavailable("dramatiq", f"Redis unavailable; job {job_id!r} may be there")
    return JobNotFoundError(job_id)


def _engines() -> list[Engine]:
    """The engines to ask about a job: all of them, less Dramatiq while Redis is known down."""
    dispatcher = get_dispatcher()
    return [
        e
        for e in dispatcher.engines
        if e is not dispatcher.dramatiq or not dispatcher.breaker.is_open
    ]


def cancel_job(job_id: str) -> JobStatus:
    """Cancel a job: a queued job never starts; a running one stops at its next step boundary
    (Dramatiq) or is cancelled (Temporal). Returns the status after the request."""
    for engine in _engines():
        outcome = _ask(engine.cancel, job_id)
        if outcome.status == CancelStatus.NOT_HERE:
            continue
        status = get_job(job_id)
        never_started = outcome.status == CancelStatus.CANCELLED or (
            engine.name == "temporal" and status.state == "cancelled"
        )
        if never_started and status.name:  # no run is left to report it
            job_event(
                job_id, status.name, "cancelled", queue=_queue_of(status.name), engine=engine.name
            )
        return status
    raise _not_found(job_id)


def _queue_of(job_name: str) -> str | None:
    try:
        return get_spec(job_name).queue
    except UnknownJobError:
        return None


def replay_job(job_id: str) -> JobHandle:
    """Run a dead, failed or cancelled job again with the same id and payload (on Dramatiq its
    finished steps keep their results). Raises JobStillActiveError for a queued or running job."""
    for engine in _engines():
        replayed_at = time.time()  # before the replay: the job may finish before it returns
        outcome = _ask(engine.replay, job_id)
        if outcome.status == ReplayStatus.NEEDS_PAYLOAD:  # cancelled while queued
            logged = get_job_record(job_id)
            payload = logged.payload if logged is not None else None
            if payload is None:
                raise JobStillActiveError(job_id, outcome.state or "unknown")
            outcome = _ask(engine.replay, job_id, payload)
        if outcome.status == ReplayStatus.NOT_HERE:
            continue
        if outcome.status == ReplayStatus.ACTIVE:
            raise JobStillActiveError(job_id, outcome.state or get_job(job_id).state)
        if engine.name == "dramatiq" and outcome.name and outcome.queue:
            dispatched_event(
                job_id, outcome.name, outcome.queue, engine.name, outcome.payload, None, replayed_at
            )
        return JobHandle(job_id, engine.name)
    raise _not_found(job_id)


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
    query = select(JobLog)
    for column, value in (("state", state), ("name", name), ("queue", queue), ("engine", engine)):
        if value:
            query = query.where(getattr(JobLog, column) == value)
    query = query.order_by(JobLog.enqueued_at.desc().nulls_last(), JobLog.job_id)
    query = query.limit(max(1, min(limit, MAX_LIST))).offset(max(0, offset))
    with session_scope() as session:
        return [JobRecord.from_row(row) for row in session.scalars(query)]


def get_job_record(job_id: str) -> JobRecord | None:
    with session_scope() as session:
        row = session.get(JobLog, job_id)
        return JobRecord.from_row(row) if row is not None else None


def get_job_steps(job_id: str) -> dict[str, Any]:
    """Finished steps and their recorded results (Dramatiq; Temporal keeps them in its history)."""
    for engine in _engines():
        steps = _ask(engine.steps, job_id)
        if steps:
            return steps
    return {}


def _dead_counts() -> dict[str, int]:
    query = select(JobLog.queue, func.count()).where(JobLog.state == "dead").group_by(JobLog.queue)
    with session_scope() as session:
        return {queue: count for queue, count in session.execute(query) if queue}


def queue_stats() -> list[QueueStats]:
    depths = _ask(get_dispatcher().dramatiq.queue_depths)
    dead = _dead_counts()
    return [
        QueueStats(d.name, d.waiting, d.in_flight, d.delayed, dead.get(d.name, 0), d.live_workers)
        for d in depths
    ]


def job_log_backlog() -> int:
    """How many Dramatiq jobs changed since the job log's shipper last wrote them."""
    return _ask(get_dispatcher().dramatiq.job_log_backlog)


def list_workers() -> list[WorkerInfo]:
    return _ask(get_dispatcher().dramatiq.workers)

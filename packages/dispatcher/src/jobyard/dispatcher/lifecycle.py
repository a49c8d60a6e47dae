"""Seeing and steering jobs on either engine: cancel, replay, list, queue and worker stats."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import func, select

from jobyard.dispatcher.dispatch import get_dispatcher, get_job
from jobyard.dispatcher.dramatiq_engine import translate
from jobyard.dispatcher.errors import EngineUnavailable, JobNotFoundError, JobStillActiveError
from jobyard.dispatcher.models import JobHandle, JobStatus
from jobyard.job_engine import JobyardError, UnknownJobError, env, get_spec
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import JobLog
from jobyard.job_engine.lifecycle import dispatched_event, job_event
from jobyard.queue import keys
from jobyard.queue.messages import encode_job_message
from jobyard.queue.queues import queue_names

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

    @classmethod
    def from_row(cls, row: JobLog) -> JobRecord:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

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


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    """Redis errors leave here as the dispatcher's own EngineUnavailable."""
    try:
        yield
    except redis.RedisError as exc:
        get_dispatcher().breaker.trip(str(exc))
        raise translate(exc) from None


def _not_found(job_id: str) -> JobyardError:
    """While Redis is unreachable a job Temporal does not know may still be Dramatiq's."""
    if get_dispatcher().breaker.is_open:
        return EngineUnavailable("dramatiq", f"Redis unavailable; job {job_id!r} may be there")
    return JobNotFoundError(job_id)


def _redis_record(job_id: str) -> dict[str, str] | None:
    dispatcher = get_dispatcher()
    if dispatcher.breaker.is_open:
        return None
    try:
        return dispatcher.dramatiq.store.get(job_id)
    except redis.RedisError as exc:
        dispatcher.breaker.trip(str(exc))
        return None


def cancel_job(job_id: str) -> JobStatus:
    """Cancel a job: a queued job never starts; a running one stops at its next step boundary
    (Dramatiq) or is cancelled (Temporal). Returns the status after the request."""
    dispatcher = get_dispatcher()
    record = _redis_record(job_id)
    if record is not None and record.get("engine") == "dramatiq":
        with _redis_errors():
            outcome = dispatcher.dramatiq.store.cancel(job_id, record["queue"])
        if outcome[0] == "cancelled":
            job_event(job_id, record["name"], "cancelled", queue=record["queue"], engine="dramatiq")
        return get_job(job_id)
    if not dispatcher.temporal.cancel(job_id):
        raise _not_found(job_id)
    status = get_job(job_id)
    if status.state == "cancelled" and status.name:  # never started, so no workflow said so
        job_event(job_id, status.name, "cancelled", queue=_queue_of(status.name), engine="temporal")
    return status


def _queue_of(job_name: str) -> str | None:
    try:
        return get_spec(job_name).queue
    except UnknownJobError:
        return None


def replay_job(job_id: str) -> JobHandle:
    """Run a dead, failed or cancelled job again with the same id and payload (on Dramatiq its
    finished steps keep their results). Raises JobStillActiveError for a queued or running job."""
    dispatcher = get_dispatcher()
    record = _redis_record(job_id)
    if record is not None and record.get("engine") == "dramatiq":
        payload = json.loads(record["payload"]) if record.get("payload") else None
        if payload is None:  # cancelled while queued: the payload is in the job log
            logged = get_job_record(job_id)
            payload = logged.payload if logged is not None else None
        if payload is None:
            raise JobStillActiveError(job_id, record.get("state", "unknown"))
        next_seq = int(record.get("seq", 0)) + 1
        kept = json.loads(record["options"]) if record.get("options") else {}
        message = encode_job_message(
            record["name"], record["queue"], job_id, payload, seq=next_seq,
            webhook_url=kept.get("webhook_url"), retry=kept.get("retry"),
        )  # fmt: skip
        replayed_at = time.time()  # before the replay: the job may finish before it returns
        with _redis_errors():
            outcome = dispatcher.dramatiq.store.replay(
                job_id, record["queue"], next_seq, message.redis_message_id, message.data
            )
        if outcome[0] != "ok":
            raise JobStillActiveError(job_id, outcome[1] if len(outcome) > 1 else outcome[0])
        dispatched_event(
            job_id, record["name"], record["queue"], "dramatiq", payload, None, replayed_at
        )
        return JobHandle(job_id, "dramatiq")
    outcome = dispatcher.temporal.replay(job_id)
    if outcome == "missing":
        raise _not_found(job_id)
    if outcome == "active":
        raise JobStillActiveError(job_id, get_job(job_id).state)
    return JobHandle(job_id, "temporal")


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
    record = _redis_record(job_id)
    if record is None or record.get("engine") != "dramatiq":
        return {}
    with _redis_errors():
        return get_dispatcher().dramatiq.store.steps(job_id)


def _dead_counts() -> dict[str, int]:
    query = select(JobLog.queue, func.count()).where(JobLog.state == "dead").group_by(JobLog.queue)
    with session_scope() as session:
        return {queue: count for queue, count in session.execute(query)}


def queue_stats() -> list[QueueStats]:
    with _redis_errors():
        return _queue_stats()


def _queue_stats() -> list[QueueStats]:
    store = get_dispatcher().dramatiq.store
    timeout_ms = int(env.get_float(env.WORKER_HEARTBEAT_TIMEOUT) * 1000)
    dead = _dead_counts()
    stats = []
    for queue in queue_names():
        pipe = store.client.pipeline(transaction=False)
        pipe.llen(keys.dramatiq_queue(queue))
        pipe.hlen(keys.dramatiq_messages(queue))
        pipe.hlen(keys.dramatiq_messages(keys.delayed(queue)))
        waiting, held, delayed = pipe.execute()
        stats.append(
            QueueStats(
                name=queue,
                depth=waiting,
                in_flight=max(0, held - waiting),
                delayed=delayed,
                dead=dead.get(queue, 0),
                live_workers=store.live_workers(queue, timeout_ms),
            )
        )
    return stats


def job_log_backlog() -> int:
    """How many Dramatiq jobs changed since the job log's shipper last wrote them."""
    with _redis_errors():
        return get_dispatcher().dramatiq.store.client.zcard(keys.job_log_changes())


def list_workers() -> list[WorkerInfo]:
    with _redis_errors():
        return _list_workers()


def _list_workers() -> list[WorkerInfo]:
    store = get_dispatcher().dramatiq.store
    timeout_s = env.get_float(env.WORKER_HEARTBEAT_TIMEOUT)
    now = store.client.time()
    cutoff = now[0] + now[1] / 1e6 - timeout_s
    workers: dict[str, WorkerInfo] = {}
    for queue in queue_names():
        for member, score in store.client.zrangebyscore(
            keys.workers(queue), cutoff * 1000, "+inf", withscores=True
        ):
            worker_id = member.decode()
            seen = score / 1000
            known = workers.get(worker_id)
            queues = [*(known.queues if known else []), queue]
            workers[worker_id] = WorkerInfo(
                worker_id, queues, max(seen, known.last_seen if known else 0)
            )
    return sorted(workers.values(), key=lambda w: w.worker_id)

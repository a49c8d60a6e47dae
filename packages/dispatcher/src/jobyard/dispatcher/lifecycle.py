"""Seeing and steering jobs on either engine: cancel, replay, list, queue and worker stats."""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, TypedDict, TypeVar, Unpack

from sqlalchemy import BindParameter, Select, bindparam, func, select
from sqlalchemy.exc import SQLAlchemyError

from jobyard.dispatcher.dispatch import get_dispatcher, get_job
from jobyard.dispatcher.engines import CancelStatus, Engine, ReplayStatus, WorkerInfo
from jobyard.dispatcher.errors import EngineUnavailable, JobNotFoundError, JobStillActiveError
from jobyard.dispatcher.models import JobHandle, JobStatus
from jobyard.job_engine import JobyardError, UnknownJobError, crypto, get_spec
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.joblog.sealed import opened, opened_for_listing
from jobyard.job_engine.db.models import JobLog, state_in
from jobyard.job_engine.db.outcomes import unfinished_children
from jobyard.job_engine.lifecycle import dispatched_event, job_event
from jobyard.job_engine.states import JobState

log = logging.getLogger("jobyard.dispatcher")

__all__ = [
    "Cursor",
    "JobRecord",
    "QueueStats",
    "WorkerInfo",
    "cancel_job",
    "cursor_of",
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
        values = {name: getattr(row, name) for name in cls.__dataclass_fields__}
        return cls(**opened(row.job_id, values))

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
    held: int = 0  # waiting for a flow-control limit (a rate window, a slot, a debounce)

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
    (Dramatiq) or is cancelled (Temporal). Its unfinished children (ctx.child, ctx.children)
    are cancelled too. Returns the status after the request."""
    status = _cancel_one(job_id)
    try:
        children = unfinished_children(job_id)
    except SQLAlchemyError:  # no job log: the children run on
        log.warning("job %s cancelled; its children are not (job log unavailable)", job_id)
        return status
    for child_id in children:
        with contextlib.suppress(JobNotFoundError):  # its dispatch never got through
            _cancel_one(child_id)
    return status


def _cancel_one(job_id: str) -> JobStatus:
    for engine in _engines():
        outcome = _ask(engine.cancel, job_id)
        if outcome.status == CancelStatus.NOT_HERE:
            continue
        status = get_job(job_id)
        never_started = outcome.status == CancelStatus.CANCELLED or (
            engine.name == "temporal" and status.state == JobState.CANCELLED
        )
        if never_started and status.name:  # no run is left to report it
            job_event(
                job_id,
                status.name,
                JobState.CANCELLED,
                queue=_queue_of(status.name),
                engine=engine.name,
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


#: What a listing reads of a row: no payload, result, progress or traceback, which can be large
#: (GET /jobs/{id} and get_job_record have those); an error message cut to SUMMARY_ERROR_CHARS.
SUMMARY_COLUMNS = (
    "job_id", "name", "queue", "engine", "state", "attempts", "error_class", "fallback_reason",
    "enqueued_at", "started_at", "finished_at", "duration_ms", "run_at",
)  # fmt: skip
SUMMARY_ERROR_CHARS = 300


@dataclass(frozen=True)
class Cursor:
    """Where a page of `list_jobs` ended: the (enqueued_at, job_id) of its last row."""

    enqueued_at: datetime | None
    job_id: str

    def encode(self) -> str:
        stamp = self.enqueued_at.isoformat() if self.enqueued_at is not None else ""
        return base64.urlsafe_b64encode(f"{stamp}|{self.job_id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor a previous page returned; ValueError if it is not one."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            stamp, sep, job_id = raw.partition("|")
            if not sep or not job_id:
                raise ValueError("no job id")
            return cls(datetime.fromisoformat(stamp) if stamp else None, job_id)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a listing cursor: {text!r}") from exc


class Listing(TypedDict, total=False):
    """The job list's filters and page: state, name, queue, engine, enqueued in [since,
    until), `job_id` (that id, or ids starting with it). Page with `after` (the `Cursor` of the
    last row of the previous page): each page is read off an index, however deep; `offset`
    still works but costs a scan of the rows it skips. `limit`: 50 unless given."""

    state: str | None
    name: str | None
    queue: str | None
    engine: str | None
    since: datetime | None
    until: datetime | None
    job_id: str | None
    after: Cursor | None
    limit: int
    offset: int


def list_jobs(**listing: Unpack[Listing]) -> list[JobRecord]:
    """Summaries from the job log (payload, result, progress and traceback left out), most
    recently enqueued first."""
    with session_scope() as session:
        return [_summary_record(row._mapping) for row in session.execute(listing_query(**listing))]


def listing_query(**listing: Unpack[Listing]) -> Select[Any]:
    """`list_jobs`'s query."""
    table = JobLog.__table__
    columns = [table.c[c] for c in SUMMARY_COLUMNS]
    # A sealed message (jobyard.job_engine.crypto) is read whole: cut, it would not decrypt.
    message = (
        table.c.error_message
        if crypto.RING is not None
        else func.substr(table.c.error_message, 1, SUMMARY_ERROR_CHARS + 1).label("error_message")
    )
    query = select(*columns, message)
    if state := listing.get("state"):
        query = query.where(state_in(state))
    for column in ("name", "queue", "engine"):
        if value := listing.get(column):
            query = query.where(table.c[column] == value)
    if (since := listing.get("since")) is not None:
        query = query.where(table.c.enqueued_at >= since)
    if (until := listing.get("until")) is not None:
        query = query.where(table.c.enqueued_at < until)
    if job_id := listing.get("job_id"):
        escaped = job_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        # A literal, as state_in's: a prepared statement's generic plan, blind to the
        # pattern, would read the whole log instead of the primary key's range.
        prefix: BindParameter[str] = bindparam("prefix", f"{escaped}%", literal_execute=True)
        query = query.where(table.c.job_id.like(prefix, escape="\\"))
    if (after := listing.get("after")) is not None:
        query = query.where(_before(after))
    # The order of a backward scan of (enqueued_at, job_id) on both databases: NULLs (rows
    # older than migration 0006 that only a late event wrote) first, as in _before.
    query = query.order_by(table.c.enqueued_at.desc().nulls_first(), table.c.job_id.desc())
    limit, offset = listing.get("limit", 50), listing.get("offset", 0)
    return query.limit(max(1, min(limit, MAX_LIST))).offset(max(0, offset))


def _before(cursor: Cursor) -> Any:
    """Rows after `cursor` in the listing's order (enqueued_at desc, NULLs first; job_id desc)."""
    c = JobLog.__table__.c
    if cursor.enqueued_at is None:
        return (c.enqueued_at.is_(None) & (c.job_id < cursor.job_id)) | c.enqueued_at.is_not(None)
    return (c.enqueued_at < cursor.enqueued_at) | (
        (c.enqueued_at == cursor.enqueued_at) & (c.job_id < cursor.job_id)
    )


def _summary_record(row: Any) -> JobRecord:
    values = opened_for_listing(row["job_id"], dict(row))
    message = values.get("error_message")
    if isinstance(message, str) and len(message) > SUMMARY_ERROR_CHARS:
        values["error_message"] = message[:SUMMARY_ERROR_CHARS] + "…"
    return JobRecord(**values)


def cursor_of(record: JobRecord) -> Cursor:
    return Cursor(record.enqueued_at, record.job_id)


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


#: Dead jobs per queue (the queue stats' dead letters).
DEAD_COUNTS = (
    select(JobLog.queue, func.count()).where(state_in(JobState.DEAD)).group_by(JobLog.queue)
)


def _dead_counts() -> dict[str, int]:
    with session_scope() as session:
        return {queue: count for queue, count in session.execute(DEAD_COUNTS) if queue}


def queue_stats() -> list[QueueStats]:
    depths = _ask(get_dispatcher().dramatiq.queue_depths)
    dead = _dead_counts()
    return [
        QueueStats(
            d.name,
            d.waiting,
            d.in_flight,
            d.delayed,
            dead.get(d.name, 0),
            d.live_workers,
            d.held,
        )
        for d in depths
    ]


def job_log_backlog() -> int:
    """How many Dramatiq jobs changed since the job log's shipper last wrote them."""
    return _ask(get_dispatcher().dramatiq.job_log_backlog)


def list_workers() -> list[WorkerInfo]:
    return _ask(get_dispatcher().dramatiq.workers)

"""Dispatch inside the caller's transaction: `dispatch_job(name, payload, connection=conn)`.

The job is checked as every dispatch checks it (submission.py), then written as one row of the
dispatch outbox in `conn`'s transaction (jobyard/job_engine/db/dispatch_outbox.py), and nothing
else: no engine is touched, so it exists if and only if the transaction commits. The relay of
every `jobyard worker` and `jobyard temporal-worker` (relay.py) sends committed rows to an
engine by the usual rules, under the job id the handle already carries, and writes the job's
`job_log` row in the same transaction as it deletes the outbox row.

`conn` is a SQLAlchemy `Connection` or `Session` (an `AsyncConnection` or `AsyncSession` with
`adispatch_job`), to the database DATABASE_URL names (the one the relays read; another is
refused, as is one without the outbox table). Until a relay sent it, `get_job` answers the job
as `queued` on the engine `outbox` (in this process while the transaction is open, and from the
outbox once it committed).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeGuard

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

if TYPE_CHECKING:  # imported at run time only by a caller that has an async connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from jobyard.dispatcher.engines import Submission
from jobyard.dispatcher.errors import UnknownUpstreamError
from jobyard.dispatcher.models import (
    NO_OPTIONS,
    OUTBOX_ENGINE,
    DispatchOptions,
    DispatchRequest,
    JobHandle,
    JobStatus,
)
from jobyard.dispatcher.submission import make_submission, submission_of
from jobyard.dispatcher.upstream import check_upstream
from jobyard.job_engine import IdempotencyConflictError, JobyardError, get_spec, tracing
from jobyard.job_engine.context import AFTER_CANCEL
from jobyard.job_engine.db import database_url, get_engine
from jobyard.job_engine.db import dispatch_outbox as outbox
from jobyard.job_engine.states import JobState

#: The options key of an outbox row that holds its dispatch's trace context (W3C headers).
OUTBOX_TRACE = "trace"

__all__ = [
    "OUTBOX_TRACE",
    "committed_status",
    "dispatch_in",
    "dispatch_many_in",
    "dispatch_on",
    "open_status",
    "options_json",
    "sql_target",
    "write_jobs",
]


def dispatch_in(connection: Any, name: str, payload: Any, **options: Any) -> JobHandle:
    """`dispatch_job(name, payload, connection=...)` on a sync SQLAlchemy Connection or Session.
    Bad input raises as `dispatch_job` does, before anything is written."""
    target, still_open = sql_target(connection)
    return dispatch_on(target, still_open, name, payload, **options)


def dispatch_on(
    target: outbox.Target,
    still_open: Callable[[], bool],
    name: str,
    payload: Any,
    *,
    new_id: bool = False,
    **options: Any,
) -> JobHandle:
    """One job into `target`'s transaction (any `Target`: Django's connection too).
    `new_id`: the given job_id was just generated, so it need not be looked up. Traced, it is
    one ``jobyard.dispatch`` span (engine "outbox") whose context the outbox row carries."""
    if tracing.setup_from_env():
        return tracing.traced_dispatch(
            lambda _: _write_one(target, still_open, name, payload, new_id, options), name
        )
    return _write_one(target, still_open, name, payload, new_id, options)


def _write_one(
    target: outbox.Target,
    still_open: Callable[[], bool],
    name: str,
    payload: Any,
    new_id: bool,
    options: dict[str, Any],
) -> JobHandle:
    job = make_submission(
        name, payload, options.get("job_id"), options.get("delay"), options.get("webhook_url"),
        options.get("retry"), options.get("priority"), options.get("after"),
        options.get("after_failure", AFTER_CANCEL),
    )  # fmt: skip
    check_spec(job)
    chosen = {job.job_id} if options.get("job_id") is not None and not new_id else set()
    (result,) = write_jobs(target, [job], still_open, chosen)
    if isinstance(result, Exception):
        raise result
    return result


class DebouncedInTransactionError(JobyardError, ValueError):
    """A debounced job dispatched with `connection=`: its burst is decided at dispatch, in the
    permit store, which the caller's transaction cannot include."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"job {name!r} is debounced, and a debounced dispatch cannot be written in a"
            " transaction: dispatch it without connection= after the transaction commits"
        )
        self.name = name


def check_spec(job: Submission) -> None:
    """What the outbox cannot carry is refused before anything is written."""
    spec = get_spec(job.name)
    spec.check_environment()
    if spec.debounce is not None:
        raise DebouncedInTransactionError(job.name)


def dispatch_many_in(
    connection: Any, requests: Iterable[DispatchRequest | tuple[str, Any]]
) -> list[JobHandle | Exception]:
    """`dispatch_many(requests, connection=...)`: one result per request, in order, its handle or
    the error `dispatch_job` would have raised for it; the valid ones are written in one
    statement, in the caller's transaction."""
    target, still_open = sql_target(connection)
    if tracing.setup_from_env():  # one span for the batch: its jobs' runs are its children
        with tracing.span(tracing.DISPATCH_MANY, {}, kind="producer"):
            return write_requests(target, list(requests), still_open)
    return write_requests(target, list(requests), still_open)


def write_requests(
    target: outbox.Target,
    requests: list[DispatchRequest | tuple[str, Any]],
    still_open: Callable[[], bool],
) -> list[JobHandle | Exception]:
    """Checks each request as `dispatch_job` does and writes the valid ones to the outbox."""
    results: list[JobHandle | Exception | None] = [None] * len(requests)
    valid: list[tuple[int, Submission]] = []
    chosen: set[str] = set()
    for index, given in enumerate(requests):
        request = DispatchRequest(*given) if isinstance(given, tuple) else given
        try:
            job = submission_of(request)
            check_spec(job)
        except (JobyardError, ValueError) as exc:
            results[index] = exc
            continue
        valid.append((index, job))
        if request.job_id is not None:
            chosen.add(job.job_id)
    written = write_jobs(target, [job for _, job in valid], still_open, chosen)
    for (index, _), result in zip(valid, written, strict=True):
        results[index] = result
    return [result for result in results if result is not None]


def write_jobs(
    target: outbox.Target,
    jobs: list[Submission],
    still_open: Callable[[], bool],
    chosen: set[str],
) -> list[JobHandle | Exception]:
    """The checked jobs' outbox rows, in the caller's transaction. A caller-chosen id (in
    `chosen`; a generated one is new) already dispatched (in the outbox, the job log or the id
    registry) is a duplicate for the same job name and `IdempotencyConflictError` for another;
    nothing is written for it."""
    outbox.check_target(target, database_url())
    unknown = unknown_upstream(target, jobs)
    known = outbox.known_names(target, sorted(chosen)) if chosen else {}
    now = time.time()
    # The dispatch's trace context rides in the row's options: the relay's send continues it.
    trace = tracing.inject() if tracing.ACTIVE else None
    results: list[JobHandle | Exception] = []
    rows: list[outbox.OutboxRow] = []
    for job in jobs:
        if job.job_id in unknown:
            results.append(unknown[job.job_id])
            continue
        name = known.get(job.job_id)
        if name is not None:
            results.append(
                JobHandle(job.job_id, OUTBOX_ENGINE, duplicate=True)
                if name == job.name
                else IdempotencyConflictError(job.job_id, f"it was dispatched as job {name!r}")
            )
            continue
        payload = (job.payload_json or json.dumps(job.payload).encode()).decode()
        rows.append(outbox.OutboxRow(
            job.job_id, job.name, job.queue, payload, options_json(job.options, trace), now,
        ))  # fmt: skip
        results.append(JobHandle(job.job_id, OUTBOX_ENGINE))
    if rows:
        outbox.insert(target, rows)
        _remember([(row.job_id, row.name) for row in rows], still_open)
    return results


def unknown_upstream(target: outbox.Target, jobs: list[Submission]) -> dict[str, Exception]:
    """job id -> the error of each job whose `after=` names a job that does not exist: not in
    the outbox (this transaction's rows too), the job log or the id registry on the caller's
    connection, nor on an engine (a job dispatched without `connection=` a moment ago)."""
    waiting = [job for job in jobs if job.options.after]
    if not waiting:
        return {}
    ids = sorted({i for job in waiting for i in (job.options.after or {}).get("ids", [])})
    found = set(outbox.known_names(target, ids))

    def status(job_id: str) -> Any:
        if job_id in found:
            return True
        from jobyard.dispatcher.dispatch import get_dispatcher  # dispatch imports this module

        return get_dispatcher().status(job_id)

    errors: dict[str, Exception] = {}
    for job in waiting:
        try:
            check_upstream(job.options.after, status)  # ValueError without the job log
        except (UnknownUpstreamError, ValueError) as exc:
            errors[job.job_id] = exc
    return errors


def options_json(options: DispatchOptions, trace: dict[str, str] | None = None) -> str | None:
    """The row's options column: what the relay's send needs besides name and payload."""
    plain = options is NO_OPTIONS or options == NO_OPTIONS
    if plain and not trace:
        return None
    given: dict[str, Any] = {} if plain else {
        "delay": options.delay, "webhook_url": options.webhook_url, "retry": options.retry,
        "priority": options.priority, "after": options.after,
    }  # fmt: skip
    if trace:
        given[OUTBOX_TRACE] = trace
    return json.dumps(given)


def is_async(connection: Any) -> TypeGuard[AsyncConnection | AsyncSession]:
    """An AsyncConnection or AsyncSession? Asked without importing sqlalchemy.ext.asyncio, which
    needs greenlet, not a dependency of the core install: a caller holding an async connection
    has imported it already."""
    asyncio_ext = sys.modules.get("sqlalchemy.ext.asyncio")
    if asyncio_ext is None:
        return False
    return isinstance(connection, asyncio_ext.AsyncConnection | asyncio_ext.AsyncSession)


def sql_target(connection: Any) -> tuple[outbox.Target, Callable[[], bool]]:
    """The outbox's view of a SQLAlchemy Connection or Session, and whether its transaction is
    still open (for `get_job` while it is)."""
    if is_async(connection):
        raise TypeError(
            "an async SQLAlchemy connection or session goes to adispatch_job / adispatch_many "
            "(await them), not to dispatch_job / dispatch_many"
        )
    if isinstance(connection, Session):
        connection = connection.connection()  # begins the session's transaction if need be
    if not isinstance(connection, Connection):
        raise TypeError(
            "connection must be a SQLAlchemy Connection or Session (or, with adispatch_job, an "
            f"AsyncConnection or AsyncSession), not {type(connection).__name__}"
        )
    transaction = connection.get_transaction() or connection.begin()
    return outbox.SqlAlchemyTarget(connection), lambda: transaction.is_active


async def adispatch_in(connection: Any, name: str, payload: Any, **options: Any) -> JobHandle:
    """`adispatch_job(..., connection=...)`: a sync Connection or Session, or an async one
    (run on its own greenlet bridge: the event loop is not blocked by a thread hop)."""
    if is_async(connection):
        return await connection.run_sync(lambda sync: dispatch_in(sync, name, payload, **options))
    return dispatch_in(connection, name, payload, **options)


async def adispatch_many_in(
    connection: Any, requests: Iterable[DispatchRequest | tuple[str, Any]]
) -> list[JobHandle | Exception]:
    listed = list(requests)
    if is_async(connection):
        return await connection.run_sync(lambda sync: dispatch_many_in(sync, listed))
    return dispatch_many_in(connection, listed)


# ---- get_job before a relay sent the job ---------------------------------------------------------

#: Jobs this process wrote in a transaction that may still be open: id -> (name, still open?).
_open: dict[str, tuple[str, Callable[[], bool]]] = {}
_open_lock = threading.Lock()
#: Past this many remembered jobs, those of closed transactions are forgotten.
_OPEN_PRUNE_AT = 10_000


def _remember(jobs: list[tuple[str, str]], still_open: Callable[[], bool]) -> None:
    with _open_lock:
        for job_id, name in jobs:
            _open[job_id] = (name, still_open)
        if len(_open) > _OPEN_PRUNE_AT:
            for job_id in [key for key, (_, alive) in _open.items() if not alive()]:
                del _open[job_id]


def open_status(job_id: str) -> JobStatus | None:
    """`queued` on the engine `outbox`, for a job this process wrote in a transaction that is
    still open (no other connection can see it yet); None otherwise."""
    with _open_lock:
        mine = _open.get(job_id)
        if mine is not None and not mine[1]():
            del _open[job_id]
            mine = None
    return _pending(job_id, mine[0]) if mine is not None else None


def committed_status(job_id: str) -> JobStatus | None:
    """`queued` on the engine `outbox`, for a job committed to the outbox that no relay has
    sent yet; None otherwise."""
    try:
        with get_engine().connect() as connection:
            name = outbox.waiting(connection, job_id)
    except SQLAlchemyError:  # no database, or no outbox: nothing waits there
        return None
    return _pending(job_id, name) if name is not None else None


def _pending(job_id: str, name: str) -> JobStatus:
    return JobStatus(job_id=job_id, engine=OUTBOX_ENGINE, state=JobState.QUEUED, attempts=0,
                     name=name)  # fmt: skip

"""dispatch_job(): validate, pick an engine, start the job once. The public functions, and the
`Dispatcher` that wires the parts together (the steps: docs/architecture.md, "The dispatch
contract"):

1. validate name, payload and options (submission.py);  a caller-chosen id is claimed in the
   job id registry first (caller_ids.py);  2-7. route the job to the preferred engine, or to
   the fallback with the same job id, so that exactly one engine runs it (routing.py);
   `dispatch_many` does the same in batches (bulk.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from typing import Any

from jobyard.dispatcher import flow, transactional
from jobyard.dispatcher.backlog import check_job_log_backlog
from jobyard.dispatcher.breaker import CircuitBreaker
from jobyard.dispatcher.bulk import BulkDispatch
from jobyard.dispatcher.caller_ids import CallerIds
from jobyard.dispatcher.engines import Engine
from jobyard.dispatcher.errors import EngineUnavailable, JobNotFoundError
from jobyard.dispatcher.models import DispatchRequest, JobHandle, JobStatus
from jobyard.dispatcher.owners import OwnerRegistry
from jobyard.dispatcher.routing import Router, record_dispatch
from jobyard.dispatcher.submission import JOB_ID_PATTERN, MAX_DELAY_SECONDS, make_submission
from jobyard.dispatcher.upstream import check_upstream
from jobyard.job_engine import RetryPolicy, children, env, get_spec, tracing
from jobyard.job_engine.context import AFTER_CANCEL
from jobyard.job_engine.db.readiness import check_setup
from jobyard.job_engine.registry import load_job_modules

__all__ = [
    "JOB_ID_PATTERN",
    "MAX_DELAY_SECONDS",
    "Dispatcher",
    "adispatch_job",
    "adispatch_many",
    "aget_job",
    "dispatch_job",
    "dispatch_many",
    "get_dispatcher",
    "get_job",
    "install_child_dispatcher",
    "reset_dispatcher",
    "warm_up",
]


class Dispatcher:
    """Routes each job to an engine. `dramatiq` is preferred; `temporal` takes what it cannot.
    Any two `Engine`s will do (named for the engines they are in production)."""

    def __init__(
        self,
        dramatiq: Engine,
        temporal: Engine,
        breaker: CircuitBreaker,
        owners: OwnerRegistry | None = None,
    ) -> None:
        self.dramatiq = dramatiq
        self.temporal = temporal
        self.breaker = breaker
        self.owners = owners or OwnerRegistry()
        self.router = Router(dramatiq, temporal, breaker, self.owners)
        self.caller_ids = CallerIds(self.router, self.owners)
        self.flow = flow.FlowDispatch(self.router)
        self.bulk = BulkDispatch(self.router, self.caller_ids, self.flow, self.status)

    @classmethod
    def from_env(cls) -> Dispatcher:
        # Imported here, not at the top: temporalio takes half a second to import, which a
        # process that imports the dispatcher but never builds one (a worker) need not pay.
        from jobyard.dispatcher.engines.dramatiq import DramatiqEngine
        from jobyard.dispatcher.engines.temporal import TemporalEngine
        from jobyard.queue.client import get_client
        from jobyard.queue.direct import DirectJobStore

        tracing.setup_from_env()  # before the Temporal client connects: it takes the tracer
        client = get_client()
        temporal = TemporalEngine(
            env.get_str(env.TEMPORAL_ADDRESS),
            env.get_str(env.TEMPORAL_NAMESPACE),
            env.get_str(env.TEMPORAL_TASK_QUEUE),
            env.get_float(env.TEMPORAL_START_TIMEOUT),
        )
        temporal.warm_up()
        breaker = CircuitBreaker(client.ping, env.get_float(env.BREAKER_PROBE_INTERVAL))
        # check_closed: a dead Redis must be "not started" (a clean fallback), not an ambiguous
        # send on a connection the server closed (a claim that waits for Redis).
        store = DirectJobStore(client, check_closed=True)
        dramatiq = DramatiqEngine(store, env.get_float(env.WORKER_HEARTBEAT_TIMEOUT))
        return cls(dramatiq, temporal, breaker)

    @property
    def engines(self) -> tuple[Engine, ...]:
        """Every engine a job may be on, in the order to look for it."""
        return (self.dramatiq, self.temporal)

    def dispatch(
        self,
        name: str,
        payload: Any,
        *,
        job_id: str | None = None,
        delay: float | None = None,
        webhook_url: str | None = None,
        retry: RetryPolicy | None = None,
        priority: int | None = None,
        after: list[str] | None = None,
        after_failure: str = AFTER_CANCEL,
    ) -> JobHandle:
        job = make_submission(
            name, payload, job_id, delay, webhook_url, retry, priority, after, after_failure
        )
        check_upstream(job.options.after, self.status)
        check_job_log_backlog()
        # An id taken by another job is a conflict whatever this process's settings are.
        owner = self.caller_ids.registered_owner(job) if job_id is not None else None
        spec = get_spec(job.name)
        spec.check_environment()
        if spec.limited:  # debounce, admission (see flow.py); unlimited jobs skip it all
            prepared = self.flow.prepare(job, spec)
            if isinstance(prepared, JobHandle):
                return prepared
            job = prepared
        started = time.time()
        handle = self.router.route(job) if job_id is None else self.caller_ids.route(job, owner)
        record_dispatch(job, handle, started)
        return handle

    def dispatch_many(
        self, requests: Iterable[DispatchRequest | tuple[str, Any]]
    ) -> list[JobHandle | Exception]:
        """`dispatch` of many jobs with the same checks and guarantees, in batches: one Lua call
        per batch of a queue's jobs, one registry statement per batch of caller-chosen ids. One
        result per request, in order: its handle, or the error `dispatch` would have raised
        for it (the other jobs are dispatched all the same)."""
        check_job_log_backlog()
        return self.bulk.dispatch_many(requests)

    def status(self, job_id: str) -> JobStatus:
        # Dispatched in a transaction of this process still open: no engine has it yet.
        pending = transactional.open_status(job_id)
        if pending is not None:
            return pending
        try:
            return self.router.status(job_id)
        except (JobNotFoundError, EngineUnavailable):
            # Committed in a caller's transaction, no relay has sent it yet.
            pending = transactional.committed_status(job_id)
            if pending is not None:
                return pending
            run_id = flow.served_by(job_id)  # a debounced dispatch collapsed into a run?
            if run_id is None:
                raise
            return flow.follow_collapsed(job_id, self.router.status(run_id), run_id)


_default: Dispatcher | None = None
_default_lock = threading.Lock()


def get_dispatcher() -> Dispatcher:
    """The process's dispatcher, built from the environment on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Dispatcher.from_env()
    return _default


def warm_up() -> Dispatcher:
    """Do the start-up work now, not in the first request: import every job module and connect
    to Temporal in the background. Call it when the web app starts."""
    load_job_modules()
    check_setup()  # one line naming what is missing or unmigrated, if anything
    return get_dispatcher()


def reset_dispatcher() -> None:
    """Forget the process's dispatcher, so the next call reads the environment again."""
    global _default
    _default = None


def dispatch_job(
    name: str,
    payload: Any,
    *,
    job_id: str | None = None,
    delay: float | None = None,
    webhook_url: str | None = None,
    retry: RetryPolicy | None = None,
    priority: int | None = None,
    connection: Any = None,
    after: list[str] | None = None,
    after_failure: str = AFTER_CANCEL,
) -> JobHandle:
    """Start job `name` with `payload`; returns at once with the job id and the engine chosen.

    Raises UnknownJobError or InvalidPayloadError (nothing started) on bad input, and
    DispatchUnavailableError when neither Dramatiq nor Temporal can take the job.
    A caller-supplied `job_id` is an idempotency key: a second dispatch starts nothing.
    With `webhook_url`, the job's final state is POSTed there (signed) by `webhook.deliver`.
    `retry` overrides the job's attempts and backoff for this dispatch.
    `priority`, an int from -100 to 100 (InvalidPriorityError otherwise), overrides the job's
    (`@job(priority=)`, default 0): among its queue's waiting jobs, higher starts first.
    With `connection` (a SQLAlchemy Connection or Session), the job is written into that
    connection's transaction and sent by a relay once it commits; a rollback leaves no trace
    (the handle's engine is "outbox"; see jobyard.dispatcher.transactional).
    With `after=[job_id, ...]` (jobs that exist: UnknownUpstreamError otherwise), the job
    waits until every one of them ended, then runs (`ctx.upstream()` gives their results by
    id); if one did not succeed it ends cancelled, naming it, unless `after_failure="run"`.
    """
    if connection is not None:
        return transactional.dispatch_in(
            connection, name, payload, job_id=job_id, delay=delay, webhook_url=webhook_url,
            retry=retry, priority=priority, after=after, after_failure=after_failure,
        )  # fmt: skip
    dispatcher = get_dispatcher()  # first: building it turns tracing on if configured
    if tracing.ACTIVE:  # off: this check is all tracing costs a dispatch
        return tracing.traced_dispatch(
            dispatcher.dispatch, name, payload, job_id=job_id, delay=delay,
            webhook_url=webhook_url, retry=retry, priority=priority, after=after,
            after_failure=after_failure,
        )  # fmt: skip
    return dispatcher.dispatch(
        name, payload, job_id=job_id, delay=delay, webhook_url=webhook_url, retry=retry,
        priority=priority, after=after, after_failure=after_failure,
    )  # fmt: skip


async def adispatch_job(
    name: str,
    payload: Any,
    *,
    job_id: str | None = None,
    delay: float | None = None,
    webhook_url: str | None = None,
    retry: RetryPolicy | None = None,
    priority: int | None = None,
    connection: Any = None,
    after: list[str] | None = None,
    after_failure: str = AFTER_CANCEL,
) -> JobHandle:
    """dispatch_job for async web code; never blocks the event loop. `connection` may also be
    an AsyncConnection or AsyncSession."""
    if connection is not None:
        return await transactional.adispatch_in(
            connection, name, payload, job_id=job_id, delay=delay, webhook_url=webhook_url,
            retry=retry, priority=priority, after=after, after_failure=after_failure,
        )  # fmt: skip
    return await asyncio.to_thread(
        dispatch_job, name, payload, job_id=job_id, delay=delay, webhook_url=webhook_url,
        retry=retry, priority=priority, after=after, after_failure=after_failure,
    )  # fmt: skip


def dispatch_many(
    requests: Iterable[DispatchRequest | tuple[str, Any]], *, connection: Any = None
) -> list[JobHandle | Exception]:
    """Start many jobs in batches; one result per request, in order: its JobHandle, or the
    exception `dispatch_job` would have raised for it (the other jobs start all the same).

    >>> results = dispatch_many([("email.send", {"to": a, ...}) for a in addresses])
    >>> failed = [r for r in results if isinstance(r, Exception)]

    Each request is a `DispatchRequest` (all of `dispatch_job`'s arguments) or a (name, payload)
    pair. The checks, the job id rules and the fallback are `dispatch_job`'s: Dramatiq takes
    the jobs one Lua call per batch; a job it cannot take goes to Temporal on its own.
    With `connection`, the jobs are written into its transaction, as `dispatch_job` does.
    """
    if connection is not None:
        return transactional.dispatch_many_in(connection, requests)
    dispatcher = get_dispatcher()
    if tracing.ACTIVE:  # one span for the batch: its jobs' runs are its children
        with tracing.span(tracing.DISPATCH_MANY, {}, kind="producer"):
            return dispatcher.dispatch_many(requests)
    return dispatcher.dispatch_many(requests)


async def adispatch_many(
    requests: Iterable[DispatchRequest | tuple[str, Any]], *, connection: Any = None
) -> list[JobHandle | Exception]:
    """dispatch_many for async web code; never blocks the event loop."""
    if connection is not None:
        return await transactional.adispatch_many_in(connection, requests)
    return await asyncio.to_thread(dispatch_many, list(requests))


def install_child_dispatcher() -> None:
    """Let jobs in this process start child jobs (`jobyard.job_engine.children`) through this
    dispatcher, one at a time or in batches."""

    def one(name: str, payload: Any, job_id: str) -> dict[str, Any]:
        return dispatch_job(name, payload, job_id=job_id).as_dict()

    def many(children: list[tuple[str, Any, str]]) -> list[dict[str, Any] | Exception]:
        requests = [DispatchRequest(name, payload, job_id) for name, payload, job_id in children]
        return [
            result.as_dict() if isinstance(result, JobHandle) else result
            for result in dispatch_many(requests)
        ]

    children.install_dispatcher(one, many)


def get_job(job_id: str) -> JobStatus:
    """The job's engine, state, attempts and result or error, whichever engine ran it."""
    return get_dispatcher().status(job_id)


async def aget_job(job_id: str) -> JobStatus:
    return await asyncio.to_thread(get_job, job_id)

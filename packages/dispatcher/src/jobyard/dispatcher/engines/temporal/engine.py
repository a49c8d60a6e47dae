"""Temporal: one workflow per job (apps/temporal_worker), started and asked through a client
that lives on a private event loop, so sync code can call it."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import hashlib
import threading
from collections.abc import Coroutine, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any, ClassVar, TypeVar

from temporalio.client import (
    Client,
    Interceptor,
    OutboundInterceptor,
    StartWorkflowInput,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import Priority, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RetryConfig

from jobyard.dispatcher.engines.base import (
    AlreadyClosed,
    AlreadyOnEngine,
    Cancellation,
    CancelStatus,
    ClaimMode,
    Engine,
    NotOnEngine,
    QueueDepth,
    Release,
    ReleaseStatus,
    Replay,
    ReplayStatus,
    Submission,
    SubmitStatus,
    Submitted,
    WorkerInfo,
)
from jobyard.dispatcher.engines.temporal.codec import data_converter
from jobyard.dispatcher.engines.temporal.contract import (
    STATUS_QUERY,
    WAKE_SIGNAL,
    WORKFLOW_NAME,
    JobRequest,
)
from jobyard.dispatcher.engines.temporal.errors import (
    ENGINE,
    map_connect_errors,
    map_temporal_errors,
)
from jobyard.dispatcher.errors import EngineUnavailable
from jobyard.dispatcher.models import EngineName, JobStatus
from jobyard.job_engine import JobState, get_spec, tracing
from jobyard.job_engine.errors import JobyardError
from jobyard.job_engine.flow.declarations import payload_key
from jobyard.job_engine.flow.limiter import CONCURRENCY
from jobyard.job_engine.states import UNFINISHED_STATES
from jobyard.job_engine.waits import is_waiting

T = TypeVar("T")

#: Every request of the dispatcher's client is sent once (temporalio's core counts the first
#: try as one of max_retries; 0 would mean "retry without end"). Its retries would resend a
#: start whose first try may have reached the server, and end, seconds later, with the last
#: try's error: a refused connection then proves nothing, and every dispatch while the server
#: is down waits out the whole timeout to be told "unknown" (errors.py).
SEND_ONCE = RetryConfig(max_retries=1)

_OPEN = UNFINISHED_STATES
_STATES = {
    WorkflowExecutionStatus.RUNNING: JobState.RUNNING,
    WorkflowExecutionStatus.COMPLETED: JobState.SUCCEEDED,
    WorkflowExecutionStatus.FAILED: JobState.FAILED,
    WorkflowExecutionStatus.TIMED_OUT: JobState.FAILED,
    WorkflowExecutionStatus.TERMINATED: JobState.FAILED,
    WorkflowExecutionStatus.CANCELED: JobState.CANCELLED,
    WorkflowExecutionStatus.CONTINUED_AS_NEW: JobState.RUNNING,
}


class TemporalEngine(Engine):
    name: ClassVar[EngineName] = "temporal"

    def __init__(self, address: str, namespace: str, task_queue: str, timeout: float) -> None:
        self.address = address
        self.namespace = namespace
        self.task_queue = task_queue
        self.timeout = timeout
        self._client: Client | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="jobyard-temporal", daemon=True
        )
        self._thread.start()
        self._warming: Future[Client] | None = None
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the loop and drop the client while the interpreter is still whole: a client
        left to the interpreter's teardown makes its native threads panic on exit."""
        if self._loop.is_closed():
            return
        warming = self._warming
        if warming is not None and not warming.done():
            # A connect still in flight completes from a native thread; if the interpreter is
            # finalizing by then, that aborts the process (a one-shot `jobyard status` that
            # found its job in Redis first). Let it finish, at most its own timeout.
            with contextlib.suppress(Exception):
                warming.result(self.timeout + 1)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=2)
        self._client = None
        gc.collect()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        # The coroutine runs in a copy of this thread's context (call_soon_threadsafe copies it
        # here), so a span current here is the parent of the client's StartWorkflow span.
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout or self.timeout)
        except FutureTimeout as exc:
            future.cancel()
            raise EngineUnavailable(
                ENGINE, f"no answer from {self.address} in time", ambiguous=True
            ) from exc

    async def client(self) -> Client:
        if self._client is None:
            with map_connect_errors(self.address):
                self._client = await asyncio.wait_for(
                    Client.connect(
                        self.address,
                        namespace=self.namespace,
                        data_converter=data_converter(),
                        interceptors=interceptors(),
                        retry_config=SEND_ONCE,
                    ),
                    self.timeout,
                )
        return self._client

    def warm_up(self) -> None:
        """Connect in the background so the first fallback does not pay for it."""
        self._warming = asyncio.run_coroutine_threadsafe(self.client(), self._loop)
        self._warming.add_done_callback(lambda f: f.exception())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the engine's loop (benchmarks and tests reach the client this way)."""
        return self._call(coro, timeout)

    def _rpc_timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout)

    async def _handle(self, job_id: str) -> WorkflowHandle[Any, Any]:
        return (await self.client()).get_workflow_handle(job_id)

    async def _start(
        self,
        request: JobRequest,
        delay: float | None,
        reuse: WorkflowIDReusePolicy,
        priority: int = 0,
    ) -> None:
        """`priority` (jobyard's, -100..100) becomes the workflow's task priority, which its
        steps inherit (see `task_priority`), with the job's concurrency key as its fairness key."""
        client = await self.client()
        with map_temporal_errors():
            await client.start_workflow(
                WORKFLOW_NAME,
                request,
                id=request.job_id,
                task_queue=self.task_queue,
                id_reuse_policy=reuse,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                start_delay=timedelta(seconds=delay) if delay else None,
                rpc_timeout=self._rpc_timeout(),
                priority=task_priority(priority, fairness_key(request.name, request.payload)),
            )

    def submit(self, job: Submission) -> Submitted:
        """Starts the job's workflow; a workflow id is never reused, whatever its state."""
        if tracing.ACTIVE and job.fallback_reason:
            attributes = tracing.job_attributes(job.job_id, job.name, job.queue, self.name)
            attributes[tracing.FALLBACK_REASON] = job.fallback_reason
            # A job the rescue moves continues the trace of its Dramatiq message.
            with tracing.span(tracing.FALLBACK, attributes, parent=job.trace):
                return self._submit(job)
        return self._submit(job)

    def _submit(self, job: Submission) -> Submitted:
        try:
            self._call(
                self._start(
                    JobRequest.of(job),
                    job.options.delay,
                    WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    job.options.priority,
                )
            )
        except AlreadyOnEngine:
            return Submitted(SubmitStatus.DUPLICATE, owner=self.name)
        return Submitted(SubmitStatus.STARTED)

    def submit_many(self, jobs: Iterable[Submission]) -> list[Submitted | EngineUnavailable]:
        """Starts the jobs' workflows concurrently (one round trip's time for the batch, not
        one per job: the rescue moves hundreds at once); each job gets its own outcome."""
        jobs = list(jobs)

        async def start(job: Submission) -> Submitted:
            request = JobRequest.of(job)
            try:
                await self._start(
                    request,
                    job.options.delay,
                    WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    job.options.priority,
                )
            except AlreadyOnEngine:
                return Submitted(SubmitStatus.DUPLICATE, owner=self.name)
            return Submitted(SubmitStatus.STARTED)

        async def one(job: Submission) -> Submitted:
            if tracing.ACTIVE and job.fallback_reason:  # as `submit`: in the job's own trace
                attributes = tracing.job_attributes(job.job_id, job.name, job.queue, self.name)
                attributes[tracing.FALLBACK_REASON] = job.fallback_reason
                # gather runs each start as its own task: the span is current in that one only.
                with tracing.span(tracing.FALLBACK, attributes, parent=job.trace):
                    return await start(job)
            return await start(job)

        async def every() -> list[Any]:
            return await asyncio.gather(*(one(job) for job in jobs), return_exceptions=True)

        try:
            # Each start has its own rpc timeout; the batch gets that plus its queueing.
            outcomes = self._call(every(), timeout=2 * self.timeout + 0.01 * len(jobs))
        except EngineUnavailable as exc:
            return [exc for _ in jobs]
        results: list[Submitted | EngineUnavailable] = []
        for outcome in outcomes:
            if isinstance(outcome, Submitted | EngineUnavailable):
                results.append(outcome)
            else:  # not one of ours: whether it started is unknown
                reason = f"{type(outcome).__name__}: {outcome}"
                results.append(EngineUnavailable(ENGINE, reason, ambiguous=True))
        return results

    def release(self, job_id: str, name: str, queue: str) -> Release:
        """Temporal keeps no claims: its workflow id is the only record, and it is final."""
        found = self.status(job_id)
        if found is None:
            return Release(ReleaseStatus.RELEASED)
        return Release(ReleaseStatus.KEPT, found.state)

    async def _status(self, job_id: str) -> JobStatus | None:
        handle = await self._handle(job_id)
        try:
            with map_temporal_errors():
                description = await handle.describe(rpc_timeout=self._rpc_timeout())
        except NotOnEngine:
            return None
        state = _STATES[description.status] if description.status else JobState.RUNNING
        live: dict[str, Any] = {}
        result = error = None
        if state == JobState.RUNNING:
            try:
                live = await asyncio.wait_for(handle.query(STATUS_QUERY), self.timeout)
            except Exception:  # no worker polling yet: the job has not started
                state = JobState.QUEUED
        elif state == JobState.SUCCEEDED:
            outcome = await handle.result()
            live, result = outcome, outcome.get("result")
        else:
            try:
                await handle.result()
            except WorkflowFailureError as exc:
                cause = exc.cause
                error = str(cause.message if hasattr(cause, "message") else cause)
                if isinstance(cause, ApplicationError) and cause.details:
                    live = cause.details[0] if isinstance(cause.details[0], dict) else {}
                    state = live.get("state", state)
        # While the workflow is open, its last bookkeeping may still be running.
        if state == JobState.RUNNING and live.get("state") in _OPEN:
            state = live["state"]
        run_at = live.get("run_at") if state in (JobState.RUNNING, JobState.QUEUED) else None
        if state == JobState.RUNNING:  # a step waiting for its next try: the job is retrying
            retry = _next_retry(description)
            if retry is not None:
                state, run_at = JobState.RETRYING, retry
        # A held job (queued) or one waiting for jobs or an event (running) says what for.
        shown = state == JobState.QUEUED or is_waiting(live.get("display_state"), state)
        return JobStatus(
            job_id=job_id,
            engine=self.name,
            state=JobState(state),
            attempts=int(live.get("attempts", 0)),
            name=live.get("name"),
            result=result,
            error=error,
            progress=live.get("progress"),
            run_at=run_at,
            display_state=live.get("display_state") if shown else None,
            waiting_reason=live.get("waiting_reason") if shown else None,
        )

    def status(self, job_id: str) -> JobStatus | None:
        return self._call(self._status(job_id), timeout=self.timeout * 3)

    async def _cancel(self, job_id: str) -> Cancellation:
        handle = await self._handle(job_id)
        try:
            with map_temporal_errors():
                described = await handle.describe(rpc_timeout=self._rpc_timeout())
                if described.status not in (None, WorkflowExecutionStatus.RUNNING):
                    # Temporal accepts a cancel request for a closed workflow and ignores it.
                    return Cancellation(CancelStatus.FINISHED, _STATES.get(described.status))
                await handle.cancel(rpc_timeout=self._rpc_timeout())
        except NotOnEngine:
            return Cancellation(CancelStatus.NOT_HERE)
        except AlreadyClosed:
            return Cancellation(CancelStatus.FINISHED)
        return Cancellation(CancelStatus.REQUESTED)

    def cancel(self, job_id: str) -> Cancellation:
        """Asks the job's workflow to cancel; it ends cancelled at its next await."""
        return self._call(self._cancel(job_id))

    async def _original_request(self, job_id: str) -> JobRequest | None:
        client = await self.client()
        handle = client.get_workflow_handle(job_id)
        try:
            with map_temporal_errors():
                async for event in handle.fetch_history_events():
                    started = event.workflow_execution_started_event_attributes
                    payloads = list(started.input.payloads)
                    return JobRequest.from_dict((await client.data_converter.decode(payloads))[0])
        except NotOnEngine:
            return None
        return None

    async def _replay(self, job_id: str) -> Replay:
        request = await self._original_request(job_id)
        if request is None:
            return Replay(ReplayStatus.NOT_HERE)
        again = JobRequest(**{**request.as_dict(), "claim": ClaimMode.NONE})
        try:
            await self._start(again, None, WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY)
        except AlreadyOnEngine:  # running or succeeded: Temporal refuses a second run
            return Replay(ReplayStatus.ACTIVE, None, request.name, request.queue)
        return Replay(ReplayStatus.REPLAYED, None, request.name, request.queue, request.payload)

    def replay(self, job_id: str, payload: Any = None) -> Replay:
        """Starts a failed, dead or cancelled job's workflow again with its original input."""
        return self._call(self._replay(job_id), timeout=self.timeout * 3)

    def wake(self, job_ids: Iterable[str]) -> int:
        """Tell the workflows of `job_ids`, held by a concurrency limit, that a slot is free:
        they ask for it now instead of at their next try (`wake_workflows`)."""

        async def told() -> int:
            return len(await wake_workflows(await self.client(), job_ids, self._rpc_timeout()))

        return self._call(told())

    def steps(self, job_id: str) -> dict[str, Any]:
        return {}  # kept in the workflow's history, shown by Temporal's own UI

    def queue_depths(self) -> list[QueueDepth]:
        return []

    def workers(self) -> list[WorkerInfo]:
        return []


class _TraceStarts(Interceptor):
    """The dispatcher's client: temporalio's TracingInterceptor on workflow starts only, not on
    status queries and cancels (each `get_job` would make a trace of its own)."""

    def __init__(self, traced: Interceptor) -> None:
        self.traced = traced

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _StartsOnly(next, self.traced.intercept_client(next))


class _StartsOnly(OutboundInterceptor):
    def __init__(self, next: OutboundInterceptor, traced: OutboundInterceptor) -> None:
        super().__init__(next)
        self.traced = traced

    async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
        return await self.traced.start_workflow(input)


def interceptors(*, worker: bool = False) -> list[Interceptor]:
    """The Temporal client's interceptors: the trace context into a started workflow's headers
    when tracing is on (jobyard.job_engine.tracing), nothing otherwise. `worker`: the client of
    `jobyard temporal-worker`, whose workflows and activities continue the trace."""
    if not tracing.ACTIVE:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    traced = TracingInterceptor(tracing.tracer())
    return [traced] if worker else [_TraceStarts(traced)]


async def wake_workflows(
    client: Client, job_ids: Iterable[str], rpc_timeout: timedelta | None = None
) -> list[str]:
    """Send the `jobyard.wake` signal to the workflows of `job_ids` (jobs held by a
    concurrency limit whose slot came free). Best effort: the ids told; a job with no open
    workflow here (a Dramatiq job, a workflow ended) is skipped, and asks again anyway."""
    ids = list(job_ids)

    async def one(job_id: str) -> bool:
        try:
            with map_temporal_errors():
                handle = client.get_workflow_handle(job_id)
                await handle.signal(WAKE_SIGNAL, rpc_timeout=rpc_timeout)
        except (NotOnEngine, AlreadyClosed, EngineUnavailable):
            return False
        return True

    told = await asyncio.gather(*(one(job_id) for job_id in ids))
    return [job_id for job_id, ok in zip(ids, told, strict=True) if ok]


#: Temporal's priority key of jobyard's priority 0: the middle of 201 levels (1 runs first).
PRIORITY_KEY_OF_ZERO = 101

#: The dev server's dynamic config under which it orders a task queue's backlog exactly by
#: `task_priority` (docs/flow-control.md "Priorities": measured on server 1.32): the new
#: matcher, one partition, 201 levels. `jobyard dev` and the tests' dev server pass them.
DEV_SERVER_PRIORITY_FLAGS = [
    "--dynamic-config-value", "matching.useNewMatcher=true",
    "--dynamic-config-value", "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value", "matching.numTaskqueueWritePartitions=1",
    "--dynamic-config-value", "matching.priorityLevels=201",
]  # fmt: skip


def task_priority(priority: int, fairness: str | None = None) -> Priority:
    """The Temporal task priority of a jobyard priority (-100..100, higher first):
    `priority_key = 101 - priority`, for a server run with the new matcher and
    `matching.priorityLevels=201` (docs/flow-control.md "Priorities"). 0 sends no key: the
    server's default, its middle level. A server without the new matcher ignores the key.
    `fairness`: the fairness key (`fairness_key`), none by default."""
    if not priority and fairness is None:
        return Priority.default
    key = PRIORITY_KEY_OF_ZERO - priority if priority else None
    return Priority(priority_key=key, fairness_key=fairness)


#: Temporal's longest fairness key, in bytes.
FAIRNESS_KEY_BYTES = 64


def fairness_key(name: str, payload: Any) -> str | None:
    """The value of the job's concurrency key (its own limit's, else its queue's), for
    Temporal's fairness within a priority level: tasks of one key do not crowd out another's.
    A longer value than Temporal takes is hashed. None for a job without a keyed concurrency
    limit, or one this process cannot read (the permit store's FIFO does not depend on it)."""
    try:
        spec = get_spec(name)
        path = next(
            (lim.key_path for lim in spec.limits if lim.kind == CONCURRENCY and lim.key_path),
            None,
        )
        if path is None:
            return None
        value = payload_key(name, payload, path)
    except (JobyardError, LookupError, ValueError):
        return None
    if len(value.encode()) > FAIRNESS_KEY_BYTES:
        return hashlib.sha256(value.encode()).hexdigest()
    return value


def _next_retry(description: Any) -> float | None:
    """When a step that failed is tried again (unix seconds), if one is waiting to be."""
    for pending in description.raw_description.pending_activities:
        if pending.attempt > 1 and pending.HasField("next_attempt_schedule_time"):
            return float(pending.next_attempt_schedule_time.ToSeconds())
    return None

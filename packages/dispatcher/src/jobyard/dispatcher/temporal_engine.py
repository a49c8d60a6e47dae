"""The Temporal side of dispatch: a client on a private event loop, usable from sync code."""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any, TypeVar

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from jobyard.dispatcher.errors import EngineUnavailable
from jobyard.dispatcher.models import JobStatus

ENGINE = "temporal"
#: The generic workflow that runs any registered job (apps/temporal_worker).
WORKFLOW_NAME = "jobyard.job"
STATUS_QUERY = "status"
T = TypeVar("T")

_OPEN = ("queued", "running", "retrying")
_STATES = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.COMPLETED: "succeeded",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.TERMINATED: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "running",
}


class TemporalEngine:
    def __init__(self, address: str, namespace: str, task_queue: str, timeout: float) -> None:
        self.address = address
        self.namespace = namespace
        self.task_queue = task_queue
        self.timeout = timeout
        self._client: Client | None = None
        self._connecting: asyncio.Future | None = None
        self._loop = asyncio.new_event_loop()
        threading.Thread(
            target=self._loop.run_forever, name="jobyard-temporal", daemon=True
        ).start()
        # Stop the loop before the interpreter finalises, or the client's native threads crash it.
        atexit.register(self._loop.call_soon_threadsafe, self._loop.stop)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout or self.timeout)
        except FutureTimeout:
            future.cancel()
            raise EngineUnavailable(ENGINE, f"no answer from {self.address} in time") from None

    async def _client_(self) -> Client:
        if self._client is None:
            try:
                self._client = await asyncio.wait_for(
                    Client.connect(self.address, namespace=self.namespace), self.timeout
                )
            except (RuntimeError, OSError, TimeoutError, RPCError) as exc:
                raise EngineUnavailable(
                    ENGINE, f"cannot connect to {self.address}: {exc}"
                ) from None
        return self._client

    def warm_up(self) -> None:
        """Connect in the background so the first fallback does not pay for it."""
        future = asyncio.run_coroutine_threadsafe(self._client_(), self._loop)
        future.add_done_callback(lambda f: f.exception())

    async def _start(self, request: dict[str, Any], delay: float | None) -> bool:
        client = await self._client_()
        try:
            await client.start_workflow(
                WORKFLOW_NAME,
                request,
                id=request["job_id"],
                task_queue=self.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                start_delay=timedelta(seconds=delay) if delay else None,
                rpc_timeout=timedelta(seconds=self.timeout),
            )
        except WorkflowAlreadyStartedError:
            return False
        except RPCError as exc:
            if exc.status == RPCStatusCode.ALREADY_EXISTS:
                return False
            raise EngineUnavailable(ENGINE, f"{exc.status.name}: {exc.message}") from None
        return True

    def start(self, request: dict[str, Any], delay: float | None = None) -> bool:
        """Start the job's workflow; False when a workflow with this job id already exists."""
        return self._call(self._start(request, delay))

    async def _status(self, job_id: str) -> JobStatus | None:
        client = await self._client_()
        handle = client.get_workflow_handle(job_id)
        try:
            description = await handle.describe(rpc_timeout=timedelta(seconds=self.timeout))
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise EngineUnavailable(ENGINE, f"{exc.status.name}: {exc.message}") from None
        state = _STATES.get(description.status, "running")
        name = None
        live: dict[str, Any] = {}
        result = error = None
        if state == "running":
            try:
                live = await asyncio.wait_for(handle.query(STATUS_QUERY), self.timeout)
            except Exception:  # no worker polling yet: the job has not started
                state = "queued"
        elif state == "succeeded":
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
        name = live.get("name")
        return JobStatus(
            job_id=job_id,
            engine=ENGINE,
            # While the workflow is open, its last bookkeeping may still be running.
            state=live.get("state", state)
            if state == "running" and live.get("state") in _OPEN
            else state,
            attempts=int(live.get("attempts", 0)),
            name=name,
            result=result,
            error=error,
            progress=live.get("progress"),
        )

    def status(self, job_id: str) -> JobStatus | None:
        return self._call(self._status(job_id), timeout=self.timeout * 3)

    async def _cancel(self, job_id: str) -> bool:
        client = await self._client_()
        try:
            await client.get_workflow_handle(job_id).cancel(
                rpc_timeout=timedelta(seconds=self.timeout)
            )
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            if exc.status == RPCStatusCode.FAILED_PRECONDITION:  # already closed
                return True
            raise EngineUnavailable(ENGINE, f"{exc.status.name}: {exc.message}") from None
        return True

    def cancel(self, job_id: str) -> bool:
        """Ask the job's workflow to cancel; False when Temporal does not know the job."""
        return self._call(self._cancel(job_id))

    async def _original_request(self, job_id: str) -> dict[str, Any] | None:
        client = await self._client_()
        handle = client.get_workflow_handle(job_id)
        try:
            async for event in handle.fetch_history_events():
                started = event.workflow_execution_started_event_attributes
                payloads = list(started.input.payloads)
                return (await client.data_converter.decode(payloads))[0]
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise EngineUnavailable(ENGINE, f"{exc.status.name}: {exc.message}") from None
        return None

    async def _replay(self, job_id: str) -> str:
        request = await self._original_request(job_id)
        if request is None:
            return "missing"
        client = await self._client_()
        try:
            await client.start_workflow(
                WORKFLOW_NAME,
                {**request, "claim": "none"},
                id=job_id,
                task_queue=self.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                rpc_timeout=timedelta(seconds=self.timeout),
            )
        except (WorkflowAlreadyStartedError, RPCError) as exc:
            if isinstance(exc, RPCError) and exc.status != RPCStatusCode.ALREADY_EXISTS:
                raise EngineUnavailable(ENGINE, f"{exc.status.name}: {exc.message}") from None
            return "active"
        return "ok"

    def replay(self, job_id: str) -> str:
        """Start a failed, dead or cancelled job's workflow again with its original input.
        "ok", "active" (running or succeeded: Temporal refuses a second run) or "missing"."""
        return self._call(self._replay(job_id), timeout=self.timeout * 3)

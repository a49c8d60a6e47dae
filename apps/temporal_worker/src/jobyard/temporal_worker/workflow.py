"""The one generic workflow: runs any registered job by name, with the job's own handler."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy as TemporalRetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    RetryState,
    TimeoutError,
    TimeoutType,
)

with workflow.unsafe.imports_passed_through():
    from jobyard.dispatcher.engines.temporal.contract import (
        STATUS_QUERY,
        WAKE_SIGNAL,
        WORKFLOW_NAME,
        ClaimMode,
        JobRequest,
        StatusReply,
    )
    from jobyard.job_engine import UpstreamFailedError, get_spec
    from jobyard.job_engine.errors import WORKER_PROCESS_DIED
    from jobyard.job_engine.states import JobState
    from jobyard.temporal_worker.activities import CLAIM_ACTIVITY
    from jobyard.temporal_worker.context import TemporalContext, emit
    from jobyard.temporal_worker.limits import RunLimits

CLAIM_TIMEOUT = timedelta(seconds=5)
#: A strict claim waits for Redis however long the outage; this caps the wait between tries.
CLAIM_RETRY_CAP = timedelta(seconds=5)
#: Workflows started before flow control replay without its permit calls (workflow.patched).
FLOW_PATCH = "jobyard-flow-control"


@workflow.defn(name=WORKFLOW_NAME)
class JobWorkflow:
    def __init__(self) -> None:
        self._ctx: TemporalContext | None = None
        self._name: str | None = None
        self._state = JobState.QUEUED
        self._limits: RunLimits | None = None  # a limited job's permits (limits.py)

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> StatusReply:
        ctx = self._ctx
        hold = self._limits.hold if self._limits else None
        if hold is None and ctx is not None and ctx.waiting is not None:
            return StatusReply(
                name=self._name, state=self._state, attempts=ctx.attempts,
                progress=ctx.progress_value, display_state=ctx.waiting.display_state,
                waiting_reason=ctx.waiting.waiting_reason,
            )  # fmt: skip
        return StatusReply(
            name=self._name,
            state=self._state,
            attempts=ctx.attempts if ctx and not hold else 0,  # held: no attempt spent
            progress=ctx.progress_value if ctx else None,
            run_at=hold["until"] if hold else ctx.sleeping_until if ctx else None,
            display_state=hold["display_state"] if hold else None,
            waiting_reason=hold["waiting_reason"] if hold else None,
        )

    @workflow.signal(name=WAKE_SIGNAL)
    def wake(self) -> None:
        """A release freed a slot this job waits for: ask again now."""
        if self._limits is not None:
            self._limits.wake()

    @workflow.run
    async def run(self, request: JobRequest) -> dict[str, Any]:
        self._name = request.name
        spec = get_spec(request.name)
        webhook_url = request.webhook_url
        self._ctx = ctx = TemporalContext(
            spec, request.job_id, webhook_url, request.retry, request.steps
        )
        common = {"job_id": ctx.job_id, "name": spec.name, "queue": spec.queue}
        started_at = workflow.now().timestamp()
        final = {**common, "started_at": started_at, "webhook_url": webhook_url}
        payload = request.payload
        try:
            if not await self._claim(request):
                workflow.logger.info("job %s already ran on Dramatiq", request.job_id)
                return {"name": self._name, "result": None, "attempts": 0, "ran_on": "dramatiq"}
            if spec.limited and workflow.patched(FLOW_PATCH):
                self._limits = limits = RunLimits(request.job_id, spec.name)
                ctx.before_sleep = limits.extend

                async def held(reply: dict[str, Any]) -> None:
                    await emit({**common, "state": JobState.QUEUED, "run_at": reply["until"],
                                "display_state": reply["display_state"],
                                "waiting_reason": reply["waiting_reason"]})  # fmt: skip

                payload = await limits.admit(request.payload, held)
                # A limited job starts when its permits are granted (the database's time).
                started_at = final["started_at"] = ctx.permit_at = limits.granted_at
            self._state = JobState.RUNNING
            # enqueued_at: for the trace's queue wait (the workflow's start, a delay included).
            enqueued_at = workflow.info().start_time.timestamp()
            await emit({**common, "state": JobState.RUNNING, "attempts": 1,
                        "started_at": started_at, "enqueued_at": enqueued_at})  # fmt: skip
            model = spec.validate(payload)
            if request.after:  # parks on timers until the jobs it runs after ended
                await ctx.wait_upstream(request.after)
            result = await spec.handler(ctx, model)
        except asyncio.CancelledError:
            await self._cancelled(final, ctx.attempts)
            raise
        except ActivityError as exc:
            if isinstance(exc.cause, CancelledError):  # a step was running when the cancel came
                await self._cancelled(final, ctx.attempts)
                raise asyncio.CancelledError() from exc
            state, message, error_type, attempts = self._failure(exc, ctx.attempts)
            await emit({**final, "state": state, "attempts": attempts, "error": message,
                        "error_class": error_type, "payload": payload})  # fmt: skip
            self._state = state
            raise ApplicationError(
                message,
                self._outcome(attempts=attempts, state=state),
                type=error_type,
                non_retryable=True,
            ) from exc
        except UpstreamFailedError as exc:  # it never runs: ends cancelled, naming the job
            await emit({**final, "state": JobState.CANCELLED, "attempts": ctx.attempts,
                        "error": str(exc), "error_class": type(exc).__name__})  # fmt: skip
            self._state = JobState.CANCELLED
            raise ApplicationError(
                str(exc),
                self._outcome(attempts=ctx.attempts, state=JobState.CANCELLED),
                type=type(exc).__name__,
                non_retryable=True,
            ) from exc
        except Exception as exc:  # the handler's own code failed: fail the job as Dramatiq does
            message, error_type = f"{type(exc).__name__}: {exc}", type(exc).__name__
            await emit({**final, "state": JobState.FAILED, "attempts": ctx.attempts,
                        "error": message, "error_class": error_type,
                        "payload": payload})  # fmt: skip
            self._state = JobState.FAILED
            raise ApplicationError(
                message,
                self._outcome(attempts=ctx.attempts, state=JobState.FAILED),
                type=error_type,
                non_retryable=True,
            ) from exc
        finally:
            if self._limits is not None:  # whatever the ending, cancelled included
                await asyncio.shield(self._limits.release())
        succeeded = {"state": JobState.SUCCEEDED, "attempts": ctx.attempts, "result": result}
        await emit({**final, **succeeded})
        self._state = JobState.SUCCEEDED
        return self._outcome(result=result, attempts=ctx.attempts)

    def _outcome(self, **fields: Any) -> dict[str, Any]:
        """What an ended run leaves for get_job (its result, or its failure's details), with the
        last progress report, which get_job shows once the job ended, as on Dramatiq."""
        progress = self._ctx.progress_value if self._ctx is not None else None
        return {"name": self._name, **fields, "progress": progress}

    async def _cancelled(self, final: dict[str, Any], attempts: int) -> None:
        await asyncio.shield(emit({**final, "state": JobState.CANCELLED, "attempts": attempts}))
        self._state = JobState.CANCELLED

    @staticmethod
    def _failure(exc: ActivityError, attempts: int) -> tuple[JobState, str, str | None, int]:
        """(state, message, error class, attempts): dead when retries ran out, else failed."""
        cause = exc.cause
        if isinstance(cause, ApplicationError):
            message, error_type = cause.message, cause.type
            if cause.details and isinstance(cause.details[0], dict):
                attempts = max(attempts, int(cause.details[0].get("attempts", attempts)))
        elif isinstance(cause, TimeoutError) and cause.type == TimeoutType.HEARTBEAT:
            message, error_type = process_died(cause.last_heartbeat_details), WORKER_PROCESS_DIED
        else:
            message, error_type = str(cause or exc), type(cause or exc).__name__
        exhausted = exc.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED
        state = JobState.DEAD if exhausted else JobState.FAILED
        return state, message, error_type, attempts

    async def _claim(self, request: JobRequest) -> bool:
        mode = request.claim
        if mode == ClaimMode.NONE:
            return True
        retry = TemporalRetryPolicy(
            maximum_attempts=1 if mode == ClaimMode.BEST_EFFORT else 0,
            maximum_interval=CLAIM_RETRY_CAP,
        )
        try:
            # Called by name, so Temporal cannot know the result type: claim_from_redis's.
            reply: dict[str, Any] = await workflow.execute_activity(
                CLAIM_ACTIVITY,
                {"job_id": request.job_id, "name": request.name, "queue": request.queue},
                start_to_close_timeout=CLAIM_TIMEOUT,
                retry_policy=retry,
            )
        except ActivityError as exc:
            if isinstance(exc.cause, CancelledError) or mode == ClaimMode.STRICT:
                raise  # cancelled while claiming: never run a job whose claim did not succeed
            return True  # best effort: Redis is down, nothing of this job can be there
        status: str = reply["status"]
        return status == "claimed"


def process_died(heartbeat: Sequence[Any]) -> str:
    """The error of a step whose worker stopped heartbeating: its process died (a step that
    killed it, the OOM killer, a host lost) or hung; the last heartbeat says where it ran."""
    where = f" {heartbeat[1]} on {heartbeat[0]}" if len(heartbeat) >= 2 else ""
    return (
        f"{WORKER_PROCESS_DIED}: the Temporal worker process{where} running this step stopped"
        " heartbeating (it died, was killed or hung)"
    )

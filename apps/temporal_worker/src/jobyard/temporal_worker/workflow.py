"""The one generic workflow: runs any registered job by name, with the job's own handler."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy as TemporalRetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from jobyard.job_engine import get_spec
    from jobyard.temporal_worker.activities import CLAIM_ACTIVITY
    from jobyard.temporal_worker.context import TemporalContext

WORKFLOW_NAME = "jobyard.job"  # the dispatcher starts it by this name
CLAIM_BEST_EFFORT, CLAIM_STRICT = "best_effort", "strict"
CLAIM_TIMEOUT = timedelta(seconds=5)
#: A strict claim waits for Redis however long the outage; this caps the wait between tries.
CLAIM_RETRY_CAP = timedelta(seconds=5)


@workflow.defn(name=WORKFLOW_NAME)
class JobWorkflow:
    def __init__(self) -> None:
        self._ctx: TemporalContext | None = None
        self._name: str | None = None
        self._state = "queued"

    @workflow.query(name="status")
    def status(self) -> dict[str, Any]:
        ctx = self._ctx
        return {
            "name": self._name,
            "state": self._state,
            "attempts": ctx.attempts if ctx else 0,
            "progress": ctx.progress_value if ctx else None,
        }

    @workflow.run
    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        self._name = request["name"]
        if not await self._claim(request):
            workflow.logger.info("job %s already ran on Dramatiq", request["job_id"])
            return {"name": self._name, "result": None, "attempts": 0, "ran_on": "dramatiq"}
        spec = get_spec(request["name"])
        self._ctx = ctx = TemporalContext(spec, request["job_id"])
        self._state = "running"
        try:
            result = await spec.handler(ctx, spec.validate(request["payload"]))
        except ActivityError as exc:
            cause = exc.cause
            message = cause.message if isinstance(cause, ApplicationError) else str(cause or exc)
            attempts = ctx.attempts
            if isinstance(cause, ApplicationError) and cause.details:
                attempts = max(attempts, int(cause.details[0].get("attempts", attempts)))
            raise ApplicationError(
                message,
                {"name": self._name, "attempts": attempts},
                type=cause.type if isinstance(cause, ApplicationError) else None,
                non_retryable=True,
            ) from None
        return {"name": self._name, "result": result, "attempts": ctx.attempts}

    async def _claim(self, request: dict[str, Any]) -> bool:
        mode = request.get("claim")
        if mode not in (CLAIM_BEST_EFFORT, CLAIM_STRICT):
            return True
        retry = TemporalRetryPolicy(
            maximum_attempts=1 if mode == CLAIM_BEST_EFFORT else 0,
            maximum_interval=CLAIM_RETRY_CAP,
        )
        try:
            reply = await workflow.execute_activity(
                CLAIM_ACTIVITY,
                {"job_id": request["job_id"], "name": request["name"], "queue": request["queue"]},
                start_to_close_timeout=CLAIM_TIMEOUT,
                retry_policy=retry,
            )
        except ActivityError:
            return True  # best effort: Redis is down, nothing of this job can be there
        return reply["status"] == "claimed"

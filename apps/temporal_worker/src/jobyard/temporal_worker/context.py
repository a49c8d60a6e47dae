"""The Temporal side of the job ctx: steps are activities, sleeps are workflow timers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy as TemporalRetryPolicy

with workflow.unsafe.imports_passed_through():
    from jobyard.job_engine import JobSpec, StepError, step_ref
    from jobyard.temporal_worker.activities import STEP_ACTIVITY

#: Temporal rejects a zero retry interval.
MIN_INTERVAL = 0.01


def temporal_retry(spec: JobSpec) -> TemporalRetryPolicy:
    retry = spec.effective_retry()
    return TemporalRetryPolicy(
        initial_interval=timedelta(seconds=max(retry.backoff, MIN_INTERVAL)),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=max(retry.max_backoff, MIN_INTERVAL)),
        maximum_attempts=retry.attempts,
        non_retryable_error_types=["PermanentError", "StepError"],
    )


class TemporalContext:
    def __init__(self, spec: JobSpec, job_id: str) -> None:
        self.job_id = job_id
        self.job_name = spec.name
        self.attempt = 1
        self.attempts = 1
        self.progress_value: Any = None
        self._spec = spec
        self._retry = temporal_retry(spec)
        self._timeout = timedelta(seconds=spec.effective_timeout())
        self._seen: set[str] = set()

    async def run(self, step: str, fn: Callable[..., Any], *args: Any) -> Any:
        if step in self._seen:
            raise StepError(f"step name {step!r} is used twice in job {self.job_name!r}")
        self._seen.add(step)
        outcome = await workflow.execute_activity(
            STEP_ACTIVITY,
            {"job_id": self.job_id, "step": step, "fn": step_ref(fn), "args": list(args)},
            start_to_close_timeout=self._timeout,
            retry_policy=self._retry,
            summary=step,
        )
        self.attempts = max(self.attempts, int(outcome["attempt"]))
        return outcome["value"]

    async def sleep(self, seconds: float) -> None:
        await workflow.sleep(timedelta(seconds=seconds))

    async def progress(self, value: float | dict[str, Any]) -> None:
        self.progress_value = value

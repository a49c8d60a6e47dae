"""The Temporal side of the job ctx: steps are activities, sleeps are workflow timers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy as TemporalRetryPolicy

with workflow.unsafe.imports_passed_through():
    from jobyard.dispatcher.engines.temporal.contract import step_task_queue
    from jobyard.job_engine import JobSpec, JobState
    from jobyard.job_engine.context import WAIT_SINCE_SUFFIX, StepRetryContext
    from jobyard.job_engine.queues import retry_policy
    from jobyard.job_engine.waits import Waiting, next_look
    from jobyard.temporal_worker.activities import (
        EVENT_ACTIVITY,
        EVENT_LOOK_ACTIVITY,
        OUTCOMES_ACTIVITY,
        STEP_ACTIVITY,
        STEP_HEARTBEAT_TIMEOUT,
    )

#: Temporal rejects a zero retry interval.
MIN_INTERVAL = 0.01
EVENT_TIMEOUT = timedelta(seconds=30)
#: One look at the job log for the endings a job waits for; retried (the database away) with
#: waits between tries of at most LOOK_RETRY_CAP, however long.
LOOK_TIMEOUT = timedelta(seconds=30)
LOOK_RETRY_CAP = timedelta(seconds=10)
#: Workflows started before sleeps were reported replay without this event (workflow.patched).
SLEEP_EVENT_PATCH = "jobyard-sleep-event"
#: Workflows started before waits were reported replay without this event (workflow.patched).
WAIT_EVENT_PATCH = "jobyard-wait-event"
#: Shorter sleeps are not worth an event (Dramatiq sleeps up to a second in the worker thread).
SLEEP_EVENT_MIN_SECONDS = 1.0


async def emit(event: dict[str, Any]) -> None:
    """Record a state change through a local activity: no extra task round trip."""
    await workflow.execute_local_activity(
        EVENT_ACTIVITY, event, start_to_close_timeout=EVENT_TIMEOUT
    )


def temporal_retry(spec: JobSpec, overrides: dict[str, Any] | None = None) -> TemporalRetryPolicy:
    retry = retry_policy(spec, overrides)
    return TemporalRetryPolicy(
        initial_interval=timedelta(seconds=max(retry.backoff, MIN_INTERVAL)),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=max(retry.max_backoff, MIN_INTERVAL)),
        maximum_attempts=retry.attempts,
        non_retryable_error_types=["PermanentError", "StepError"],
    )


class TemporalContext(StepRetryContext):
    """A failed step is retried as an activity, not the whole job: `attempt` (and `attempts`,
    which the workflow reports) is the highest activity attempt a step has needed."""

    def __init__(
        self,
        spec: JobSpec,
        job_id: str,
        webhook_url: str | None = None,
        retry_overrides: dict[str, Any] | None = None,
        recorded: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(job_id, spec.name)
        # Steps the job finished on Dramatiq before it moved here: never run again.
        self._recorded = recorded or {}
        self.webhook_url = webhook_url
        self._progress_reports = 0
        self.progress_value: Any = None
        self.sleeping_until: float | None = None  # the status query shows it
        self.waiting: Waiting | None = None  # and what a wait for jobs or an event waits for
        #: Awaited with a durable sleep's seconds before it starts (a limited job's leases are
        #: extended to its end: limits.py).
        self.before_sleep: Callable[[float], Awaitable[None]] | None = None
        self._spec = spec
        self._retry = temporal_retry(spec, retry_overrides)
        self._timeout = timedelta(seconds=spec.effective_timeout())
        # Steps run on their queue's task queue, with the queue's slots (worker.py).
        self._steps_on = step_task_queue(workflow.info().task_queue, spec.queue)

    async def _run_step(
        self, step: str, ref: str, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        if step in self._recorded:
            return self._recorded[step]
        outcome = await workflow.execute_activity(
            STEP_ACTIVITY,
            {"job_id": self.job_id, "step": step, "fn": ref, "args": list(args)},
            task_queue=self._steps_on,
            start_to_close_timeout=self._timeout,
            # A step whose worker died is retried once its heartbeats stop, not at its timeout.
            heartbeat_timeout=STEP_HEARTBEAT_TIMEOUT,
            retry_policy=self._retry,
            summary=step,
        )
        self.saw_attempt(int(outcome["attempt"]))
        return outcome["value"]  # already JSON: it crossed Temporal's JSON payload converter

    async def _sleep(self, name: str, seconds: float) -> None:
        if name in self._recorded:  # begun on Dramatiq: wake when it would have woken there
            seconds = float(self._recorded[name]) - workflow.now().timestamp()
            if seconds <= 0:
                return
        if self.before_sleep is not None:
            await self.before_sleep(seconds)
        wake_at = workflow.now().timestamp() + seconds
        self.sleeping_until = wake_at
        if seconds >= SLEEP_EVENT_MIN_SECONDS and workflow.patched(SLEEP_EVENT_PATCH):
            # the job log and the event stream show the job sleeping until wake_at
            await emit({
                "job_id": self.job_id, "name": self.job_name, "queue": self._spec.queue,
                "state": JobState.RUNNING, "attempts": self.attempts, "run_at": wake_at,
            })  # fmt: skip
        await workflow.sleep(timedelta(seconds=seconds))
        self.sleeping_until = None

    async def _wait_for_jobs(
        self, wait: str, job_ids: list[str], shown: Waiting
    ) -> list[dict[str, Any]]:
        """Looks at the job log (a local activity: one marker in the history, no task round
        trip) between workflow timers, which hold no worker, until every job ended. The
        children go through dispatch and may run on either engine, so a Temporal child
        workflow, which only Temporal could run, cannot stand for them."""
        if wait in self._recorded:  # ended while the job was on Dramatiq
            recorded: list[dict[str, Any]] = self._recorded[wait]
            return recorded
        began = self._wait_began(wait)
        self.waiting = shown
        await self._announce(shown)
        while True:
            outcomes: list[dict[str, Any]] | None = await self._look(OUTCOMES_ACTIVITY, job_ids)
            if outcomes is not None:
                self.waiting = None
                return outcomes
            await workflow.sleep(timedelta(seconds=next_look(workflow.now().timestamp() - began)))

    async def _wait_for_event(
        self, record: str, wait: dict[str, Any], shown: Waiting
    ) -> dict[str, Any] | None:
        """As `_wait_for_jobs`, with a last look at the timeout."""
        if record in self._recorded:  # taken (or timed out) while the job was on Dramatiq
            recorded: dict[str, Any] | None = self._recorded[record]
            return recorded
        began, timeout = self._wait_began(record), wait["timeout"]
        self.waiting = shown
        await self._announce(shown)
        while True:
            now = workflow.now().timestamp()  # before the look: an event sent by now is in it
            event: dict[str, Any] | None = await self._look(
                EVENT_LOOK_ACTIVITY, {**wait, "began": began}
            )
            if event is not None or (timeout is not None and now >= began + timeout):
                self.waiting = None
                return event
            look = next_look(now - began)
            if timeout is not None:  # a last look at the timeout (a timer of 0 s is none)
                look = max(min(look, began + timeout - now), MIN_INTERVAL)
            await workflow.sleep(timedelta(seconds=look))

    async def _announce(self, shown: Waiting) -> None:
        """The job log and the event stream show the job waiting, and for what."""
        if workflow.patched(WAIT_EVENT_PATCH):
            await emit({
                "job_id": self.job_id, "name": self.job_name, "queue": self._spec.queue,
                "state": JobState.RUNNING, "attempts": self.attempts,
                "display_state": shown.display_state, "waiting_reason": shown.waiting_reason,
                "announced": True,
            })  # fmt: skip

    def _wait_began(self, record: str) -> float:
        """When the wait `record` began: on Dramatiq, if the job moved here in the middle of it."""
        since = self._recorded.get(record + WAIT_SINCE_SUFFIX)
        return float(since) if since is not None else workflow.now().timestamp()

    async def _look(self, activity: str, arg: Any) -> Any:
        """One look (a local activity: one marker in the history, no task round trip),
        retried while the database is away."""
        return await workflow.execute_local_activity(
            activity,
            arg,
            start_to_close_timeout=LOOK_TIMEOUT,
            retry_policy=TemporalRetryPolicy(maximum_interval=LOOK_RETRY_CAP),
        )

    async def _progress(self, value: Any, encoded: str) -> None:
        self.progress_value = value
        self._progress_reports += 1
        await emit({
            "job_id": self.job_id, "name": self.job_name, "state": "progress", "progress": value,
            "seq": self._progress_reports, "webhook_url": self.webhook_url,
        })  # fmt: skip

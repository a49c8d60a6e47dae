"""Runs one Dramatiq message of a job: the handler, then finish, retry or park.

Dramatiq's own retries are off for jobyard actors: retries and durable sleeps are re-enqueued
here through `JobStore.reschedule`, which advances the job's seq and acks the current message
in the same Lua call, so a crash can never leave the job with two live messages, or none.
Every terminal call acks the message too, and marks it so that Dramatiq skips its own ack.
State changes go to `jobyard.job_engine.lifecycle` (metrics, webhook events, and the job log
unless the store marks changes for the job log's shipper, see jobyard/worker/shipper.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Coroutine
from typing import Any

import redis
from dramatiq.middleware import CurrentMessage
from dramatiq.middleware.time_limit import TimeLimitExceeded

from jobyard.job_engine import JobSpec, PermanentError, UpstreamFailedError, crypto, env
from jobyard.job_engine.db import joblog
from jobyard.job_engine.db.steps import begin_step, recall_steps
from jobyard.job_engine.errors import WORKER_PROCESS_DIED
from jobyard.job_engine.flow.waiting import Hold
from jobyard.job_engine.lifecycle import job_event, progress_event
from jobyard.job_engine.queues import get_queue, retry_policy
from jobyard.job_engine.states import JobState
from jobyard.job_engine.waits import Waiting
from jobyard.queue.context import (
    Cancelled,
    DiedTooOften,
    DramatiqContext,
    LostOwnership,
    Suspend,
)
from jobyard.queue.dramatiq_compat import ACKED
from jobyard.queue.eager import discard_loop, run_eagerly
from jobyard.queue.flow import PAYLOAD_STEP, Held, RunPermits
from jobyard.queue.messages import AFTER, RESUME, RETRY, SEQ, WEBHOOK, encode_job_message
from jobyard.queue.reclaim import died_error, is_suspect
from jobyard.queue.store import NO_DELIVERY, Delivery, JobStore, StartResult

log = logging.getLogger("jobyard.worker")
ENGINE = "dramatiq"


#: Seconds past a run's time limit before Dramatiq's TimeLimit interrupts the worker thread. Steps
#: are stopped at the limit itself (jobyard.queue.deadline); the backstop is for handler code
#: outside steps, late enough not to land in the bookkeeping of a step's timeout.
TIME_LIMIT_BACKSTOP = 3.0


def time_limit(spec: JobSpec) -> float:
    """Seconds one run of the job may take: its timeout, capped by its queue's limit."""
    return min(spec.effective_timeout(), get_queue(spec.queue).time_limit)


class JobRunner:
    """The function behind a job's Dramatiq actor."""

    def __init__(self, store: JobStore, spec: JobSpec, broker_id: str) -> None:
        self.store = store
        self.spec = spec
        self.broker_id = broker_id
        self.retry = retry_policy(spec)  # env is read once per worker, not per job
        self.time_limit = time_limit(spec)
        # With the job log on, returned steps are kept in its database too (see steps.py).
        journal = joblog.enabled() and env.get_bool(env.STEP_JOURNAL)
        self.journal = begin_step if journal else None
        self.recall = recall_steps if journal else None
        self.__name__ = spec.name

    def __call__(self, job_id: str, payload: Any) -> None:
        # Any: at run time this is dramatiq's MessageProxy (it has .fail()), which dramatiq types
        # as a plain Message.
        message: Any = CurrentMessage.get_current_message()
        options = message.options if message is not None else {}
        delivery = (
            Delivery(self.broker_id, message.queue_name, options["redis_message_id"])
            if message is not None
            else NO_DELIVERY
        )
        run = _Run(self, job_id, payload, options, delivery)
        try:
            run.execute()
        except redis.RedisError as exc:
            # Redis failed under the run's own bookkeeping, so what Redis holds is unknown here.
            # Without this, Dramatiq (no Retries middleware) would ack the message away and the
            # job would stay "running" for good. Failed, it is nacked, which JobyardConsumer
            # turns into a requeue once Redis answers; the rerun's seq check makes it safe.
            log.warning("job %s: bookkeeping failed (%s); message requeued", job_id, exc)
            if message is not None and not run.acked:
                message.fail()
            return
        if message is not None and run.acked:
            setattr(message, ACKED, True)


class _Run:
    """One execution of a job's handler, from one message."""

    def __init__(
        self,
        runner: JobRunner,
        job_id: str,
        payload: Any,
        options: dict[str, Any],
        delivery: Delivery,
    ) -> None:
        self.runner, self.spec, self.store = runner, runner.spec, runner.store
        self.job_id, self.payload, self.delivery = job_id, payload, delivery
        self.seq, self.resume = int(options.get(SEQ, 0)), bool(options.get(RESUME, False))
        self.webhook_url: str | None = options.get(WEBHOOK)
        self.retry_overrides: dict[str, Any] | None = options.get(RETRY)
        self.after: dict[str, Any] | None = options.get(AFTER)  # dispatched after other jobs
        self.retry = (
            retry_policy(self.spec, self.retry_overrides) if self.retry_overrides else runner.retry
        )
        self.acked = False
        self.progress_count = 0
        self.permits: RunPermits | None = None  # a limited job's permits (jobyard.queue.flow)
        # A suspect (taken back from a dead process, see jobyard.queue.reclaim) runs alone, and
        # its start is recorded before its handler runs, with the attempts it may use.
        self.suspect = is_suspect(options)
        self.ctx = DramatiqContext(
            self.store, self.spec.name, job_id, self.seq, self.resume,
            on_start=self.started, on_progress=self.progressed, time_limit=runner.time_limit,
            journal=runner.journal, suspect_attempts=self.retry.attempts if self.suspect else 0,
            recall=runner.recall,
        )  # fmt: skip

    def event(self, state: str, start: StartResult | None, **fields: Any) -> None:
        job_event(
            self.job_id, self.spec.name, state, queue=self.spec.queue, engine=ENGINE,
            attempts=start.attempts if start else None,
            started_at=start.started_at if start else None,
            webhook_url=self.webhook_url, logged=self.store.logs_changes, **fields,
        )  # fmt: skip

    def started(self, start: StartResult) -> None:
        self.event(JobState.RUNNING, start)

    def progressed(self, value: Any) -> None:
        self.progress_count += 1
        progress_event(
            self.job_id, self.spec.name, value, self.progress_count, self.webhook_url,
            logged=self.store.logs_changes,
        )  # fmt: skip

    def execute(self) -> None:
        try:
            # Sealed in its message (jobyard.job_engine.crypto): a key missing here fails the
            # run like any error, retried by the job's policy, its payload kept sealed.
            self.payload = crypto.unseal(self.job_id, self.payload)
            if self.spec.limited:  # flow control (jobyard.queue.flow); the only cost otherwise
                self.pass_limits()
            elif self.suspect:
                self.ctx.start()
            model = self.spec.validate(self.payload)
            handler = self.spec.handler(self.ctx, model)
            result: Any = run_eagerly(self.after_upstream(handler) if self.after else handler)
        except Suspend as suspend:
            if self.permits is not None:
                self.permits.keep(suspend.seconds)  # its slots stay its own through the sleep
                self.permits = None
            self.reschedule(
                JobState.RUNNING, suspend.seconds, resume=True, waiting=suspend.shown,
                announce=suspend.announce,
            )  # fmt: skip
        except Held as held:  # no permit: parked, its Lua start never made (no attempt)
            state = JobState.RUNNING if self.resume else JobState.QUEUED
            self.reschedule(state, held.seconds, resume=self.resume, hold=held.hold)
        except DiedTooOften as died:
            self.died_too_often(died)
        except UpstreamFailedError as exc:  # it never runs: ends cancelled, naming the job
            self.finish(JobState.CANCELLED, error=str(exc), error_class=type(exc).__name__)
        except Cancelled:
            self.finish(JobState.CANCELLED)
        except LostOwnership as lost:
            log.info("job %s: message dropped (%s)", self.job_id, lost)
            if str(lost) in ("stale", "lost") and self.permits is not None:
                self.permits.forget()  # the job's live copy holds the same leases
                self.permits = None
            if str(lost) == JobState.CANCELLED:
                self.event(JobState.CANCELLED, None)
        except redis.RedisError:
            raise  # not the job's failure: see JobRunner.__call__
        except (Exception, TimeLimitExceeded) as exc:
            if isinstance(exc, TimeLimitExceeded):
                discard_loop()
            self.failed(exc)
        else:
            self.succeeded(result)
        finally:
            if self.permits is not None:  # every ending but a sleep gives its slots back
                self.permits.release()

    async def after_upstream(self, handler: Coroutine[Any, Any, Any]) -> Any:
        """The handler, once every job it was dispatched after ended (the wait parks the job,
        as a long sleep does: see BaseJobContext.wait_upstream)."""
        try:
            assert self.after is not None
            await self.ctx.wait_upstream(self.after)
        except BaseException:
            handler.close()  # never started: no "never awaited" warning
            raise
        return await handler

    def pass_limits(self) -> None:
        """Every permit before the handler runs at all (Held if refused), then the run's
        start: so no step of it runs before its permit, and a job that never touches ctx asks
        too. A debounced run gets its burst's last payload, recorded for a retry."""
        self.permits = RunPermits(self.store, self.spec, self.job_id, self.payload, self.resume)
        payload = self.permits.acquire()
        self.ctx.permit_at = self.permits.granted_at
        self.ctx.start()
        if payload is not None:
            self.payload = self.ctx.recorded(PAYLOAD_STEP, payload)

    def succeeded(self, result: Any) -> None:
        if self.ctx.started is None:
            start = self.store.complete(
                self.job_id, self.seq, resume=self.resume, result=result, delivery=self.delivery
            )
            self.acked = True
            if start.status != "ok":
                log.info("job %s: result dropped (%s)", self.job_id, start.status)
                return
            self.event(JobState.SUCCEEDED, start, result=result)
        else:
            self.finish(JobState.SUCCEEDED, result=result)

    def finish(self, state: str, **fields: Any) -> None:
        start = self.ctx.started
        payload = fields.pop("payload", None)
        steps, recorded = self.ctx.unrecorded(), False
        try:
            written = self.store.finish(
                self.job_id, self.seq, state, result=fields.get("result"),
                error=fields.get("error") or "", error_class=fields.get("error_class") or "",
                delivery=self.delivery, payload=payload, traceback=fields.get("traceback") or "",
                steps=steps,
            )  # fmt: skip
            recorded = True
        finally:
            self.ctx.settle_unrecorded(recorded)
        self.acked = True
        if written is None:  # a superseded copy (see seq) must not report an outcome
            return
        if written != state:  # cancelled at the boundary of its last step, which this was
            state, fields = written, {}
        self.event(state, start, payload=payload, **fields)

    def died_too_often(self, died: DiedTooOften) -> None:
        """Its process died during its last attempt: dead, not run again."""
        error = died_error(died.start.attempts, died.start.died)
        log.warning("job %s dead after %d attempt(s): %s", self.job_id, died.start.attempts, error)
        self.finish(
            JobState.DEAD, error=error, error_class=WORKER_PROCESS_DIED, payload=self.payload
        )

    def failed(self, exc: BaseException) -> None:
        try:
            attempt = self.ctx.attempt  # starts the run if the handler failed before any step
        except LostOwnership:
            return
        error, error_class = f"{type(exc).__name__}: {exc}", type(exc).__name__
        retry = self.retry
        if isinstance(exc, PermanentError) or attempt >= retry.attempts:
            state = JobState.FAILED if isinstance(exc, PermanentError) else JobState.DEAD
            log.warning(
                "job %s %s after %d attempt(s): %s",
                self.job_id, state, attempt, crypto.loggable(error, error_class),
            )  # fmt: skip
            detail = "".join(traceback.format_exception(exc))[-4000:]
            self.finish(
                state, error=error, error_class=error_class, traceback=detail, payload=self.payload
            )
            return
        delay = retry.delay_before(attempt)
        shown = crypto.loggable(error, error_class)
        log.info("job %s attempt %d: %s; retry in %.1fs", self.job_id, attempt, shown, delay)
        retrying = self.reschedule(
            JobState.RETRYING, delay, resume=False, error=error, error_class=error_class
        )
        if retrying:
            self.event(JobState.RETRYING, self.ctx.started, error=error, error_class=error_class)

    def reschedule(
        self,
        state: str,
        delay: float,
        *,
        resume: bool,
        error: str = "",
        error_class: str = "",
        hold: Hold | None = None,
        waiting: Waiting | None = None,
        announce: bool = False,
    ) -> bool:
        """`hold`: parked by a flow-control limit (in the queue's parked set, where a release
        can wake it early, not on the delay queue). `waiting`: what a job waiting for other jobs
        or an event shows meanwhile (it waits on the delay queue, as a sleep)."""
        # The next run must find this run's returned steps in Redis, journal or not. A job
        # lost meanwhile, the reschedule finds lost too; a cancel, the next run's start.
        with contextlib.suppress(LostOwnership, Cancelled):
            self.ctx.record_unrecorded()
        encoded = encode_job_message(
            self.spec.name, self.spec.queue, self.job_id, self.payload,
            seq=self.seq + 1, resume=resume,
            delay_seconds=max(delay, 0.001) if hold is None else None,
            webhook_url=self.webhook_url, retry=self.retry_overrides, after=self.after,
        )  # fmt: skip
        shown = None if hold is None else (self.spec.queue, hold.display_state, hold.waiting_reason)
        owned = self.store.reschedule(
            self.job_id, self.seq, self.seq + 1, state, encoded.queue,
            encoded.redis_message_id, encoded.data,
            error=error, error_class=error_class, delivery=self.delivery,
            # shown as the job's next run; a wait's next look is no run (and, not shown, adds
            # no event to the job's story per look)
            run_at_ms=int((time.time() + delay) * 1000) if waiting is None else 0,
            hold=shown,
            waiting=None if waiting is None else (waiting.display_state, waiting.waiting_reason),
            announce=announce,
        )  # fmt: skip
        self.acked = True
        return owned

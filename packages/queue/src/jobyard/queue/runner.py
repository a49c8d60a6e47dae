"""Runs one Dramatiq message of a job: the handler, then finish, retry or park.

Dramatiq's own retries are off for jobyard actors: retries and durable sleeps are re-enqueued
here through `JobStore.reschedule`, which advances the job's seq and acks the current message
in the same Lua call, so a crash can never leave the job with two live messages, or none.
Every terminal call acks the message too, and marks it so that Dramatiq skips its own ack.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from typing import Any

from dramatiq.middleware import CurrentMessage
from dramatiq.middleware.time_limit import TimeLimitExceeded

from jobyard.job_engine import JobSpec, PermanentError
from jobyard.queue.context import DramatiqContext, LostOwnership, Suspend, Throttled
from jobyard.queue.messages import RESUME, SEQ, encode_job_message
from jobyard.queue.store import NO_DELIVERY, Delivery, JobStore

log = logging.getLogger("jobyard.worker")
_loops = threading.local()
#: Set on a MessageProxy once a jobyard Lua call has acked it (see JobyardConsumer).
ACKED = "jobyard_acked"


def _event_loop() -> asyncio.AbstractEventLoop:
    """One loop per worker thread, reused across messages (asyncio.run per job costs ~100 us)."""
    loop = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = _loops.loop = asyncio.new_event_loop()
    return loop


def _discard_event_loop() -> None:
    loop = getattr(_loops, "loop", None)
    if loop is not None:
        loop.close()
        _loops.loop = None


class JobRunner:
    """The function behind a job's Dramatiq actor."""

    def __init__(self, store: JobStore, spec: JobSpec, broker_id: str) -> None:
        self.store = store
        self.spec = spec
        self.broker_id = broker_id
        self.retry = spec.effective_retry()
        rate = spec.rate_limit
        self.rate = (rate.calls, int(rate.period * 1000)) if rate else None
        self.__name__ = spec.name

    def __call__(self, job_id: str, payload: Any) -> None:
        message = CurrentMessage.get_current_message()
        options = message.options if message is not None else {}
        seq, resume = int(options.get(SEQ, 0)), bool(options.get(RESUME, False))
        delivery = (
            Delivery(self.broker_id, message.queue_name, options["redis_message_id"])
            if message is not None
            else NO_DELIVERY
        )
        ctx = DramatiqContext(self.store, self.spec.name, job_id, seq, resume, self.rate)
        run = _Run(self, ctx, job_id, payload, seq, resume, delivery)
        run.execute()
        if message is not None and run.acked:
            setattr(message, ACKED, True)


class _Run:
    def __init__(
        self,
        runner: JobRunner,
        ctx: DramatiqContext,
        job_id: str,
        payload: Any,
        seq: int,
        resume: bool,
        delivery: Delivery,
    ) -> None:
        self.runner, self.ctx, self.job_id, self.payload = runner, ctx, job_id, payload
        self.seq, self.resume, self.delivery = seq, resume, delivery
        self.acked = False

    def execute(self) -> None:
        spec = self.runner.spec
        try:
            result = _event_loop().run_until_complete(
                spec.handler(self.ctx, spec.validate(self.payload))
            )
        except Suspend as suspend:
            self.reschedule("running", suspend.seconds, resume=True)
        except Throttled as throttled:
            self.reschedule("queued", throttled.seconds, resume=self.resume)
        except LostOwnership as lost:
            log.info("job %s: message dropped (%s)", self.job_id, lost)
        except (Exception, TimeLimitExceeded) as exc:
            if isinstance(exc, TimeLimitExceeded):
                _discard_event_loop()
            self.failed(exc)
        else:
            self.succeeded(result)

    def succeeded(self, result: Any) -> None:
        store = self.runner.store
        if self.ctx.started is None:
            status = store.complete(
                self.job_id, self.seq, resume=self.resume, result=result, delivery=self.delivery
            )
            if status != "ok":
                log.info("job %s: result dropped (%s)", self.job_id, status)
        else:
            store.finish(self.job_id, self.seq, "succeeded", result=result, delivery=self.delivery)
        self.acked = True

    def failed(self, exc: BaseException) -> None:
        try:
            attempt = self.ctx.attempt  # starts the run if the handler failed before any step
        except (LostOwnership, Throttled):
            return
        error, error_class = f"{type(exc).__name__}: {exc}", type(exc).__name__
        retry = self.runner.retry
        if isinstance(exc, PermanentError) or attempt >= retry.attempts:
            log.warning("job %s failed after %d attempt(s): %s", self.job_id, attempt, error)
            detail = "".join(traceback.format_exception(exc))[-4000:]
            self.runner.store.finish(
                self.job_id, self.seq, "failed", error=detail, error_class=error_class,
                delivery=self.delivery,
            )  # fmt: skip
            self.acked = True
            return
        delay = retry.delay_before(attempt)
        log.info(
            "job %s attempt %d failed (%s); retry in %.1fs", self.job_id, attempt, error, delay
        )
        self.reschedule("retrying", delay, resume=False, error=error, error_class=error_class)

    def reschedule(
        self, state: str, delay: float, *, resume: bool, error: str = "", error_class: str = ""
    ) -> None:
        spec = self.runner.spec
        encoded = encode_job_message(
            spec.name, spec.queue, self.job_id, self.payload,
            seq=self.seq + 1, resume=resume, delay_seconds=max(delay, 0.001),
        )  # fmt: skip
        self.runner.store.reschedule(
            self.job_id, self.seq, self.seq + 1, state, encoded.queue,
            encoded.redis_message_id, encoded.data,
            error=error, error_class=error_class, delivery=self.delivery,
        )  # fmt: skip
        self.acked = True

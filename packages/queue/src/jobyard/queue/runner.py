"""Runs one Dramatiq message of a job: start, handler, then finish, retry or park.

Dramatiq's own retries are off for jobyard actors: retries and durable sleeps are re-enqueued
here through `JobStore.reschedule`, which advances the job's seq in the same Lua call, so a
crash between the two can never leave the job with two live messages.
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
from jobyard.queue.context import DramatiqContext, LostOwnership, Suspend
from jobyard.queue.messages import RESUME, SEQ, encode_job_message
from jobyard.queue.store import JobStore

log = logging.getLogger("jobyard.worker")
_loops = threading.local()


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

    def __init__(self, store: JobStore, spec: JobSpec) -> None:
        self.store = store
        self.spec = spec
        self.retry = spec.effective_retry()
        rate = spec.rate_limit
        self.rate = (rate.calls, int(rate.period * 1000)) if rate else None
        self.__name__ = spec.name

    def __call__(self, job_id: str, payload: Any) -> None:
        message = CurrentMessage.get_current_message()
        options = message.options if message is not None else {}
        seq, resume = int(options.get(SEQ, 0)), bool(options.get(RESUME, False))
        start = self.store.start(job_id, self.spec.name, seq, resume=resume, rate=self.rate)
        if start.status == "throttled":
            self._reschedule(job_id, payload, seq, "queued", start.retry_in_ms / 1000, resume)
            return
        if start.status != "ok":
            log.info("job %s: message dropped (%s)", job_id, start.status)
            return
        ctx = DramatiqContext(self.store, self.spec.name, job_id, seq, start.attempts, start.steps)
        try:
            model = self.spec.validate(payload)
            result = _event_loop().run_until_complete(self.spec.handler(ctx, model))
        except Suspend as suspend:
            self._reschedule(job_id, payload, seq, "running", suspend.seconds, resume=True)
        except LostOwnership:
            log.warning("job %s: handed to another engine while running; result dropped", job_id)
        except (Exception, TimeLimitExceeded) as exc:
            if isinstance(exc, TimeLimitExceeded):
                _discard_event_loop()
            self._failed(job_id, payload, seq, start.attempts, exc)
        else:
            self.store.finish(job_id, seq, "succeeded", result=result)

    def _failed(self, job_id: str, payload: Any, seq: int, attempt: int, exc: BaseException) -> None:
        error, error_class = f"{type(exc).__name__}: {exc}", type(exc).__name__
        if isinstance(exc, PermanentError) or attempt >= self.retry.attempts:
            log.warning("job %s failed after %d attempt(s): %s", job_id, attempt, error)
            detail = "".join(traceback.format_exception(exc))[-4000:]
            self.store.finish(job_id, seq, "failed", error=detail, error_class=error_class)
            return
        delay = self.retry.delay_before(attempt)
        log.info("job %s attempt %d failed (%s); retry in %.1fs", job_id, attempt, error, delay)
        self._reschedule(job_id, payload, seq, "retrying", delay, False, error, error_class)

    def _reschedule(
        self,
        job_id: str,
        payload: Any,
        seq: int,
        state: str,
        delay: float,
        resume: bool,
        error: str = "",
        error_class: str = "",
    ) -> None:
        encoded = encode_job_message(
            self.spec.name,
            self.spec.queue,
            job_id,
            payload,
            seq=seq + 1,
            resume=resume,
            delay_seconds=max(delay, 0.001),
        )
        self.store.reschedule(
            job_id,
            seq,
            seq + 1,
            state,
            encoded.queue,
            encoded.redis_message_id,
            encoded.data,
            error=error,
            error_class=error_class,
        )

"""The Dramatiq side of the job ctx: steps recorded in Redis, long sleeps as delayed messages."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable
from typing import Any

from jobyard.job_engine import StepError, step_ref
from jobyard.queue.store import JobStore, StartResult

#: Sleeps up to this long happen in the worker thread; longer ones free it.
IN_THREAD_SLEEP_LIMIT = 1.0
SLEEP_STEP_PREFIX = "__sleep__:"


class Suspend(BaseException):
    """Raised through the handler to park the job for `seconds`; BaseException so that a
    handler's `except Exception` cannot swallow it."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class LostOwnership(BaseException):
    """The job belongs to Temporal, is finished, or this message is a stale duplicate."""


class Cancelled(BaseException):
    """Cancellation was asked for; the job stops at this step boundary."""


class Throttled(BaseException):
    """The job's rate limit is used up; try again in `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class DramatiqContext:
    """Starts the run in Redis lazily, at the first step, sleep or progress: until then the
    handler has done nothing observable, and a job that never touches ctx finishes in a single
    Redis call (JobStore.complete)."""

    def __init__(
        self,
        store: JobStore,
        job_name: str,
        job_id: str,
        seq: int,
        resume: bool,
        rate: tuple[int, int] | None,
        on_start: Callable[[StartResult], None] | None = None,
        on_progress: Callable[[Any], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.job_name = job_name
        self._store = store
        self._seq = seq
        self._resume = resume
        self._rate = rate
        self._on_start = on_start
        self._on_progress = on_progress
        self._started: StartResult | None = None
        self._recorded: dict[str, str] = {}
        self._seen: set[str] = set()
        self._sleeps = 0

    @property
    def started(self) -> StartResult | None:
        return self._started

    @property
    def attempt(self) -> int:
        return self.start().attempts

    def start(self) -> StartResult:
        if self._started is None:
            result = self._store.start(
                self.job_id, self.job_name, self._seq, resume=self._resume, rate=self._rate
            )
            if result.status == "throttled":
                raise Throttled(result.retry_in_ms / 1000)
            if result.status != "ok":
                raise LostOwnership(result.status)
            self._started, self._recorded = result, result.steps
            if self._on_start is not None:
                self._on_start(result)
        return self._started

    def _claim_name(self, step: str) -> None:
        if step in self._seen:
            raise StepError(f"step name {step!r} is used twice in job {self.job_name!r}")
        self._seen.add(step)

    def _record(self, step: str, encoded: str) -> None:
        outcome = self._store.record_step(self.job_id, self._seq, step, encoded)
        if outcome == "lost":
            raise LostOwnership(self.job_id)
        self._recorded[step] = encoded
        if outcome == "cancel":
            raise Cancelled(self.job_id)

    async def run(self, step: str, fn: Callable[..., Any], *args: Any) -> Any:
        self.start()
        self._claim_name(step)
        step_ref(fn)  # the same rule as on Temporal, so a job that runs here runs there too
        if step in self._recorded:
            return json.loads(self._recorded[step])
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        try:
            encoded = json.dumps(result)
        except (TypeError, ValueError) as exc:
            raise StepError(f"step {step!r} must return JSON data: {exc}") from None
        self._record(step, encoded)
        return json.loads(encoded)

    async def sleep(self, seconds: float) -> None:
        self.start()
        self._sleeps += 1
        step = f"{SLEEP_STEP_PREFIX}{self._sleeps}"
        self._claim_name(step)
        if step in self._recorded:
            wake_at = float(json.loads(self._recorded[step]))
        else:
            wake_at = time.time() + seconds
            self._record(step, json.dumps(wake_at))
        remaining = wake_at - time.time()
        if remaining <= 0:
            return
        if remaining <= IN_THREAD_SLEEP_LIMIT:
            await asyncio.sleep(remaining)
            return
        raise Suspend(remaining)

    async def progress(self, value: float | dict[str, Any]) -> None:
        self.start()
        self._store.record_progress(self.job_id, self._seq, json.dumps(value))
        if self._on_progress is not None:
            self._on_progress(value)

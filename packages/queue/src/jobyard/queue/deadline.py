"""A step's function run against the job's time limit, in a thread the worker can give up on.

Dramatiq's TimeLimit raises an exception in the worker thread, which only lands between Python
bytecodes: a step blocked in C (a socket read, `time.sleep`, a lock) runs on past the limit and
holds the worker thread with it. So a step's function runs in a helper thread (one per worker
thread, reused), and the worker thread waits for it only until the job's deadline. At the
deadline the worker thread raises TimeLimitExceeded, which fails the run like any error (retried
or dead per the job's policy), and abandons the helper: a stuck call finishes whenever it
finishes, in its own thread, and its late result goes nowhere (it is never recorded, so the
step counts as interrupted and runs again on a retry, as any interrupted step may).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from dramatiq.middleware.time_limit import TimeLimitExceeded

log = logging.getLogger("jobyard.worker")
_local = threading.local()
_names = itertools.count(1)
#: Seconds the worker thread waits for the step at a time: an exception raised in it from
#: another thread (Dramatiq's TimeLimit) lands only between two of these waits.
_WAIT_SLICE = 0.1


class _Helper:
    """A worker thread's step thread. Handing it a call is two bare locks (one released each
    way): a ThreadPoolExecutor's submit, Future and Conditions cost a step several times more."""

    def __init__(self) -> None:
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._call: Callable[[], Any] | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        name = f"jobyard-step-{next(_names)}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            self._go.acquire()
            call = self._call
            if call is None:  # retired
                return
            try:
                self._value, self._error = call(), None
            except BaseException as exc:  # the step's own error, raised in the worker thread
                self._value, self._error = None, exc
            self._done.release()

    def start(self, call: Callable[[], Any]) -> None:
        self._call = call
        self._go.release()

    def wait(self, deadline: float) -> bool:
        """True once the call returned or raised, False at `deadline` (monotonic seconds)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._done.acquire(True, min(remaining, _WAIT_SLICE)):
                return True

    def result(self) -> Any:
        error, self._error = self._error, None
        if error is not None:
            raise error
        value, self._value = self._value, None
        return value

    def retire(self) -> None:
        """Its thread ends when its call returns (or at once, if it has not begun it)."""
        self._call = None
        # Already released for the call and not yet taken: the thread reads None and ends.
        with contextlib.suppress(RuntimeError):
            self._go.release()


def _helper() -> _Helper:
    helper: _Helper | None = getattr(_local, "helper", None)
    if helper is None:
        helper = _local.helper = _Helper()
    return helper


def _abandon(helper: _Helper) -> None:
    """Forget this worker thread's helper (its thread exits once its stuck call returns)."""
    _local.helper = None
    helper.retire()


def _expired(step: str, limit: float) -> TimeLimitExceeded:
    return TimeLimitExceeded(f"step {step!r} ran past the job's time limit of {limit:g} s")


async def run_step(
    step: str, fn: Callable[..., Any], args: tuple[Any, ...], deadline: float | None, limit: float
) -> Any:
    """`fn(*args)` (awaited if async), raising TimeLimitExceeded at `deadline` (monotonic
    seconds) and freeing the calling thread then; no deadline runs it in this thread."""
    if deadline is None:
        result = fn(*args)
        return await result if inspect.isawaitable(result) else result
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _expired(step, limit)
    if inspect.iscoroutinefunction(fn):
        # Cooperative: cancelled at its next await (an async step that blocks the loop in C
        # is stopped by Dramatiq's TimeLimit as before).
        try:
            return await asyncio.wait_for(fn(*args), remaining)
        except TimeoutError as exc:
            raise _expired(step, limit) from exc
    helper = _helper()
    # The step sees the worker thread's context variables (tracing spans, for one).
    context = contextvars.copy_context()
    helper.start(lambda: context.run(fn, *args))
    finished = False
    try:
        finished = helper.wait(deadline)
    finally:
        if not finished:  # timed out, or an exception reached this thread while it waited
            _abandon(helper)
    if not finished:
        log.warning("step %r ran past the job's time limit (%g s): abandoned", step, limit)
        raise _expired(step, limit)
    result = helper.result()
    return await result if inspect.isawaitable(result) else result

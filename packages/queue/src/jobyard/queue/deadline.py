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
import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from dramatiq.middleware.time_limit import TimeLimitExceeded

log = logging.getLogger("jobyard.worker")
_local = threading.local()


def _helper() -> ThreadPoolExecutor:
    executor: ThreadPoolExecutor | None = getattr(_local, "executor", None)
    if executor is None:
        executor = _local.executor = ThreadPoolExecutor(1, thread_name_prefix="jobyard-step")
    return executor


def _abandon(executor: ThreadPoolExecutor) -> None:
    """Forget this worker thread's helper (its thread exits once its stuck call returns)."""
    _local.executor = None
    executor.shutdown(wait=False, cancel_futures=True)


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
    executor = _helper()
    # The step sees the worker thread's context variables (tracing spans, for one).
    future: Future[Any] = executor.submit(contextvars.copy_context().run, fn, *args)
    try:
        result = future.result(timeout=remaining)
    except FutureTimeout as exc:
        log.warning("step %r ran past the job's time limit (%g s): abandoned", step, limit)
        raise _expired(step, limit) from exc
    finally:
        if not future.done():  # timed out, or an exception reached this thread while it waited
            _abandon(executor)
    return await result if inspect.isawaitable(result) else result

"""A Dramatiq step past the run's deadline frees the worker thread even when it blocks in C
(jobyard.queue.deadline); the fault suite's time-limit row checks the same with real workers."""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import threading
import time

import pytest
from dramatiq.middleware.time_limit import TimeLimitExceeded

from jobyard.queue.deadline import run_step

TRACE = contextvars.ContextVar("TRACE", default="none")


def block(seconds: float, done: list[str]) -> str:
    time.sleep(seconds)  # one call in C: an exception raised in this thread cannot stop it
    done.append("returned late")
    return "late"


def where() -> tuple[str, str]:
    return TRACE.get(), threading.current_thread().name


async def wait_on(future: asyncio.Future[str]) -> str:
    return await future


def test_a_blocked_step_is_given_up_at_the_deadline_and_its_result_discarded() -> None:
    done: list[str] = []
    began = time.monotonic()
    with pytest.raises(TimeLimitExceeded, match="step 'stuck' ran past the job's time limit"):
        asyncio.run(run_step("stuck", block, (1.5, done), time.monotonic() + 0.3, 0.3))
    assert time.monotonic() - began < 1.0  # freed at the deadline, not when the call returns
    # The next step runs at once, in a new helper thread (the old one is still stuck).
    TRACE.set("span-1")
    value, thread = asyncio.run(run_step("next", where, (), time.monotonic() + 5, 5))
    assert value == "span-1" and thread.startswith("jobyard-step")  # context variables go along
    time.sleep(1.5)
    assert done == ["returned late"]  # it did finish, and nobody took its result


def test_no_deadline_runs_the_step_in_the_calling_thread() -> None:
    assert asyncio.run(run_step("here", where, (), None, 0))[1] == threading.current_thread().name


def test_an_async_step_past_the_deadline_is_cancelled() -> None:
    async def main() -> None:
        never: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        with pytest.raises(TimeLimitExceeded):
            await run_step("async", wait_on, (never,), time.monotonic() + 0.2, 0.2)
        assert never.cancelled()

    asyncio.run(main())


class _TimeLimit(BaseException):
    """Stands for Dramatiq's TimeLimitExceeded, raised in a job's thread from another thread."""


def _raise_in(thread: threading.Thread, exc: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))


def test_a_worker_thread_waiting_on_a_step_is_interrupted_at_once_and_its_helper_retired() -> None:
    """Dramatiq's TimeLimit (the backstop) raises in the worker thread from another thread; it
    lands only when the thread runs Python again, so the wait for the step must not block in C
    for long. The step's helper is retired (it ends once its call returns); the thread's next
    step runs in a new one."""
    done: list[str] = []
    outcome: dict[str, object] = {}

    def worker() -> None:
        began = time.monotonic()
        try:
            asyncio.run(run_step("stuck", block, (1.5, done), time.monotonic() + 30, 30))
        except _TimeLimit:
            outcome["interrupted after"] = time.monotonic() - began
        outcome["next"] = asyncio.run(run_step("next", where, (), time.monotonic() + 5, 5))[1]

    helpers_before = {t.name for t in threading.enumerate()}
    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.2)
    stuck = {t.name for t in threading.enumerate() if t.name.startswith("jobyard-step")}
    stuck -= helpers_before  # other tests' helpers, of threads still alive
    _raise_in(thread, _TimeLimit)
    thread.join(5)
    assert float(outcome["interrupted after"]) < 0.6, outcome  # type: ignore[arg-type]
    assert outcome["next"] not in stuck  # a new helper
    time.sleep(1.6)
    assert done == ["returned late"]
    alive = {t.name for t in threading.enumerate()}
    assert not stuck & alive  # the retired helper's thread ended once its call returned

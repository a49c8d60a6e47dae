"""A Dramatiq step past the run's deadline frees the worker thread even when it blocks in C
(jobyard.queue.deadline); the fault suite's time-limit row checks the same with real workers."""

from __future__ import annotations

import asyncio
import contextvars
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

"""Runs a job handler's coroutine in a Dramatiq worker thread, entering the event loop only if
the handler actually waits on something.

Most handlers never wait: their steps are plain functions, or they return at once (system.echo).
A full `run_until_complete` still costs two loop iterations, each polling the selector, which
in a worker process whose threads contend for the GIL is a good part of a short job's cost.
So the handler's task takes its first step at once, in the calling thread, as Python 3.12's
`asyncio.eager_task_factory` does: it is a real Task on a running loop, so `current_task()`,
`asyncio.timeout()` and anyio work as usual. Only if that step leaves the task waiting does
the loop run, until the task is done.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from contextvars import Context
from typing import Any, TypeVar

T = TypeVar("T")
_local = threading.local()


class EagerLoop(asyncio.SelectorEventLoop):
    """A selector loop whose `run` takes a new task's first step without a loop iteration."""

    _first_step: list[tuple[Callable[..., Any], tuple[Any, ...], Context | None]] | None = None

    def call_soon(  # type: ignore[override]  # returns None for the step it keeps
        self, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> asyncio.Handle | None:
        if self._first_step is not None and not self._first_step:
            # Task.__init__ schedules its first step here: keep it for `run` to call directly.
            self._first_step.append((callback, args, context))
            return None
        return super().call_soon(callback, *args, context=context)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        self._first_step = []
        try:
            task = self.create_task(coro)
            [(step, args, context)] = self._first_step
        finally:
            self._first_step = None
        asyncio.events._set_running_loop(self)  # public to loop implementations (events.__all__)
        try:
            if context is None:
                step(*args)
            else:
                context.run(step, *args)
        finally:
            asyncio.events._set_running_loop(None)
        if task.done():
            return task.result()
        return self.run_until_complete(task)


def run_eagerly(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end on this thread's loop (one per worker thread, reused)."""
    loop = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = EagerLoop()
    return loop.run(coro)


def discard_loop() -> None:
    """Drop this thread's loop, e.g. after a time limit interrupted a task half-way."""
    loop = getattr(_local, "loop", None)
    if loop is not None:
        loop.close()
        _local.loop = None

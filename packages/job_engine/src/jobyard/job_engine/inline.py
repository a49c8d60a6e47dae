"""A third, in-process engine: runs a job to completion in the calling thread.

For tests of business services and for `jobyard run NAME` when debugging a handler. Steps run once
each, retried with the job's policy; sleeps really sleep. Nothing is recorded across processes.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import uuid
from collections.abc import Callable
from typing import Any

from jobyard.job_engine.errors import PermanentError, StepError
from jobyard.job_engine.registry import JobSpec, get_spec


class InlineContext:
    def __init__(self, spec: JobSpec, job_id: str) -> None:
        self.job_id = job_id
        self.job_name = spec.name
        self.attempt = 1
        self.steps: dict[str, Any] = {}
        self.progress_values: list[Any] = []
        self._retry = spec.effective_retry()

    async def run(self, step: str, fn: Callable[..., Any], *args: Any) -> Any:
        if step in self.steps:
            raise StepError(f"step name {step!r} is used twice in job {self.job_name!r}")
        for attempt in range(1, self._retry.attempts + 1):
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    result = await result
                break
            except PermanentError:
                raise
            except Exception:
                if attempt == self._retry.attempts:
                    raise
                await asyncio.sleep(self._retry.delay_before(attempt))
        self.steps[step] = json.loads(json.dumps(result))
        return self.steps[step]

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def progress(self, value: float | dict[str, Any]) -> None:
        self.progress_values.append(value)


async def arun_inline(name: str, payload: Any, *, job_id: str | None = None) -> Any:
    spec = get_spec(name)
    model = spec.validate(payload)
    ctx = InlineContext(spec, job_id or uuid.uuid4().hex)
    return await asyncio.wait_for(spec.handler(ctx, model), spec.effective_timeout())


def run_inline(name: str, payload: Any, *, job_id: str | None = None) -> Any:
    return asyncio.run(arun_inline(name, payload, job_id=job_id))

"""A third, in-process engine: runs a job to completion in the calling thread.

For tests of business services and for `jobyard run NAME` when debugging a handler. Steps run once
each, retried with the job's policy, as Temporal retries an activity; sleeps really sleep; the job's
timeout holds. Nothing is recorded across processes, so there is nothing to resume or cancel but
the running task itself.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from jobyard.job_engine.children import check_children
from jobyard.job_engine.context import StepRetryContext
from jobyard.job_engine.errors import PermanentError
from jobyard.job_engine.registry import JobSpec, get_spec
from jobyard.job_engine.states import JobState


class InlineContext(StepRetryContext):
    def __init__(
        self, spec: JobSpec, job_id: str, on_progress: Callable[[Any], None] | None = None
    ) -> None:
        super().__init__(job_id, spec.name)
        self.spec = spec
        self.steps: dict[str, Any] = {}
        self.progress_values: list[Any] = []
        self._retry = spec.effective_retry()
        self._on_progress = on_progress

    async def execute(self, payload: BaseModel) -> Any:
        """Run the job's handler on a validated payload, within the job's timeout."""
        return await asyncio.wait_for(
            self.spec.handler(self, payload), self.spec.effective_timeout()
        )

    async def _run_step(
        self, step: str, ref: str, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        for attempt in range(1, self._retry.attempts + 1):
            self.saw_attempt(attempt)
            try:
                if inspect.iscoroutinefunction(fn):
                    result = await fn(*args)
                else:
                    # In a thread, as on Temporal: the job's timeout can end the handler while a
                    # blocking step still runs (the thread finishes it; it cannot be killed).
                    result = await asyncio.to_thread(fn, *args)
                    if inspect.isawaitable(result):
                        result = await result
                break
            except PermanentError:
                raise
            except Exception:
                if attempt == self._retry.attempts:
                    raise
                await asyncio.sleep(self._retry.delay_before(attempt))
        self.steps[step] = json.loads(self.encode_result(step, result))
        return self.steps[step]

    async def _sleep(self, name: str, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _fan_in(
        self, wait: str, children: list[tuple[str, Any, str]], keyed: dict[str, str]
    ) -> list[dict[str, Any]]:
        """Each child runs here, inline too, all at once; its outcome as the engines' job log
        would give it (failed: a PermanentError, dead: any other error, cancelled)."""
        check_children(children)
        return list(await asyncio.gather(*(_outcome(*child) for child in children)))

    async def _progress(self, value: Any, encoded: str) -> None:
        self.progress_values.append(value)
        if self._on_progress is not None:
            self._on_progress(value)


async def _outcome(name: str, payload: Any, job_id: str) -> dict[str, Any]:
    spec = get_spec(name)
    outcome: dict[str, Any] = {"job_id": job_id, "result": None, "error": None}
    try:
        outcome["result"] = await InlineContext(spec, job_id).execute(spec.validate(payload))
        return {**outcome, "state": JobState.SUCCEEDED}
    except asyncio.CancelledError:
        if (task := asyncio.current_task()) is not None and task.cancelling():
            raise  # the parent is being cancelled, not the child
        return {**outcome, "state": JobState.CANCELLED}
    except Exception as exc:
        state = JobState.FAILED if isinstance(exc, PermanentError) else JobState.DEAD
        return {**outcome, "state": state, "error": f"{type(exc).__name__}: {exc}"}


async def arun_inline(
    name: str,
    payload: Any,
    *,
    job_id: str | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> Any:
    spec = get_spec(name)
    model = spec.validate(payload)
    return await InlineContext(spec, job_id or uuid.uuid4().hex, on_progress).execute(model)


def run_inline(name: str, payload: Any, *, job_id: str | None = None) -> Any:
    return asyncio.run(arun_inline(name, payload, job_id=job_id))

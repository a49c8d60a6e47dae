"""The small surface a job handler talks to. Each engine implements it; handlers never see which.

Rules for handler bodies (the orchestration):

* Deterministic: no I/O, no wall clock, no randomness, no threads. Put every side effect in a step:
  ``await ctx.run("fetch", fetch_page, url)``. On Temporal the handler *is* a workflow and is
  replayed; on Dramatiq it is re-run from the top after a retry or a long sleep, and finished steps
  return their recorded results instead of running again.
* Step functions are module-level functions (sync or async) so either engine can import them by
  name; their arguments and results are JSON data (dicts, lists, str, numbers, bool, None).
* Step names are unique within one job run.
* Pause with ``await ctx.sleep(seconds)``, never ``asyncio.sleep``: it is durable on both engines.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from jobyard.job_engine.errors import StepError


@runtime_checkable
class JobContext(Protocol):
    """What a handler may use. `attempt` counts runs of this job, starting at 1."""

    job_id: str
    job_name: str
    attempt: int

    async def run(self, step: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` once as a recorded, retried step and return its JSON result."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Pause durably for `seconds`."""
        ...

    async def progress(self, value: float | dict[str, Any]) -> None:
        """Publish progress (a fraction 0..1 or a JSON dict) for `get_job` to show."""
        ...


def step_ref(fn: Callable[..., Any]) -> str:
    """The import path `module:qualname` that lets another process find `fn`."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise StepError(
            f"step function {fn!r} must be a module-level function (no lambdas or closures), "
            "so that every engine can import it by name"
        )
    return f"{module}:{qualname}"


def resolve_step(ref: str) -> Callable[..., Any]:
    module_name, _, qualname = ref.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target

"""Starting a job from inside a job (a callback webhook, one email per recipient).

job_engine does not depend on the dispatcher; each process that runs jobs installs it here at
start-up (`jobyard worker`, `jobyard temporal-worker`). Call it from a step so that a retried
parent does not dispatch twice, and give the child a job id derived from the parent's, so that
even a repeated step starts the child once (dispatch treats a known job id as already started):

    await ctx.run("notify", dispatch_child, "webhook.deliver", body, f"{ctx.job_id}:notify")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobyard.job_engine.errors import JobyardError

ChildDispatcher = Callable[[str, Any, str], dict[str, Any]]

_dispatcher: ChildDispatcher | None = None


def install_dispatcher(dispatcher: ChildDispatcher | None) -> None:
    """`dispatcher(name, payload, job_id) -> {"job_id": ..., "engine": ...}`."""
    global _dispatcher
    _dispatcher = dispatcher


def dispatch_child(name: str, payload: Any, job_id: str) -> dict[str, Any]:
    """Step function: dispatch `name` with a stable `job_id`; returns the child's handle as JSON."""
    if _dispatcher is None:
        raise JobyardError(
            "no dispatcher is installed in this process; "
            "call jobyard.job_engine.children.install_dispatcher() at start-up"
        )
    return _dispatcher(name, payload, job_id)

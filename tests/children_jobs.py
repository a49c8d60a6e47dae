"""Jobs with children for tests/test_children.py (with tests/conformance_jobs.py's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobyard.job_engine import ChildFailedError, JobContext, PermanentError, job
from tests.conformance_jobs import RETRY, Markers, child_calls, wait_for_go
from tests.jobs import append_marker


@job("children.gated", payload=Markers, retry=RETRY, timeout=60)
async def gated(ctx: JobContext, payload: Markers) -> bool:
    """Runs until a file named `go` appears in marker_dir (or 30 s)."""
    return await ctx.run("gate", wait_for_go, payload.marker_dir, 30)


@job("children.gated_parent", payload=Markers, retry=RETRY, timeout=60)
async def gated_parent(ctx: JobContext, payload: Markers) -> dict[str, Any]:
    directory = payload.marker_dir
    await ctx.run("before", append_marker, directory, "before")
    opened = await ctx.child("children.gated", {"marker_dir": directory}, key="gate")
    after = await ctx.run("after", append_marker, directory, "after")
    return {"opened": opened, "after": after}


@job("children.report", payload=Markers, retry=RETRY, timeout=60)
async def report(ctx: JobContext, payload: Markers) -> dict[str, Any]:
    """Dispatched `after` other jobs: their results by id (a failure as its state)."""
    await ctx.run("report", append_marker, payload.marker_dir, "report")
    upstream = await ctx.upstream()
    return {k: v.state if isinstance(v, ChildFailedError) else v for k, v in upstream.items()}


class EventWait(Markers):
    event: str
    match: dict[str, Any] = {}
    timeout: float | None = None
    times: int = 1


@job("children.wait_event", payload=EventWait, retry=RETRY, timeout=60)
async def wait_event(ctx: JobContext, payload: EventWait) -> dict[str, Any]:
    """Waits `times` times for event `event` matching `match`; the data each wait took."""
    await ctx.run("before", append_marker, payload.marker_dir, "before")
    taken = [
        await ctx.wait_for_event(payload.event, match=payload.match, timeout=payload.timeout)
        for _ in range(payload.times)
    ]
    await ctx.run("after", append_marker, payload.marker_dir, "after")
    return {"events": taken}


def refuse_unless_fixed(directory: str) -> str:
    append_marker(directory, "finish")
    if not (Path(directory) / "fixed").exists():
        raise PermanentError("not fixed yet")
    return "fixed"


@job("children.replayable", payload=Markers, retry=RETRY, timeout=60)
async def replayable(ctx: JobContext, payload: Markers) -> dict[str, Any]:
    """Fans out two children, then fails until a file `fixed` exists: a replay goes on."""
    directory = payload.marker_dir
    results = await ctx.children(child_calls(directory, [1, 2]))
    finish = await ctx.run("finish", refuse_unless_fixed, directory)
    return {"results": results, "finish": finish}

"""Jobs of bench_children (JOBYARD_JOB_MODULES=_bench_children_jobs, bench/ on PYTHONPATH)."""

from __future__ import annotations

import time

from pydantic import BaseModel

from jobyard.job_engine import JobContext, RetryPolicy, job

RETRY = RetryPolicy(attempts=3)


class FanPayload(BaseModel):
    children: int


class ChildPayload(BaseModel):
    i: int


@job("bench.fan_child", queue="default", payload=ChildPayload, retry=RETRY, timeout=60)
async def fan_child(ctx: JobContext, payload: ChildPayload) -> int:
    """A trivial child: its result is its index."""
    return payload.i


@job("bench.fan_parent", queue="default", payload=FanPayload, retry=RETRY, timeout=60)
async def fan_parent(ctx: JobContext, payload: FanPayload) -> dict[str, float]:
    """Fans out `children` trivial children; the moments it began the fan-out and resumed."""
    began = await ctx.run("began", time.time)
    results = await ctx.children([("bench.fan_child", {"i": i}) for i in range(payload.children)])
    resumed = await ctx.run("resumed", time.time)
    assert results == list(range(payload.children)), "results out of order"
    return {"began": began, "resumed": resumed}

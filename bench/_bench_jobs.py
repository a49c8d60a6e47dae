"""Jobs only the benchmarks use (JOBYARD_JOB_MODULES=_bench_jobs, with bench/ on PYTHONPATH).

`bench.step` is bench_throughput's; `bench.w_*` are bench_workloads' (see _workload.py): a
handler written as the README teaches, its I/O in `ctx.run` steps. The marks are written on
Dramatiq only (a Temporal workflow must not do I/O; bench_workloads counts Temporal's jobs in
the job log).
"""

from __future__ import annotations

from typing import Any

from _workload import WORKLOADS, io_step, mark
from pydantic import BaseModel, ConfigDict

from jobyard.job_engine import JobContext, RetryPolicy, job


class StepPayload(BaseModel):
    model_config = ConfigDict(extra="allow")


def echo_step(value: Any) -> Any:
    return value


@job("bench.step", queue="default", payload=StepPayload, retry=RetryPolicy(attempts=1), timeout=10)
async def one_step(ctx: JobContext, payload: StepPayload) -> Any:
    """system.echo with its work in one recorded step: what a step costs a job."""
    return await ctx.run("echo", echo_step, payload.model_dump(mode="json"))


class WorkPayload(BaseModel):
    seg: str
    i: int
    t: float
    order: dict[str, Any] | None = None


def _mark(ctx: JobContext, kind: str, payload: WorkPayload) -> None:
    if type(ctx).__name__ != "TemporalContext":
        mark(kind, {"seg": payload.seg, "i": payload.i, "t": payload.t})


RETRY = RetryPolicy(attempts=3)


@job("bench.w_noop", queue="default", payload=WorkPayload, retry=RETRY, timeout=60)
async def w_noop(ctx: JobContext, payload: WorkPayload) -> None:
    _mark(ctx, "s", payload)
    _mark(ctx, "d", payload)


@job("bench.w_step1", queue="default", payload=WorkPayload, retry=RETRY, timeout=60)
async def w_step1(ctx: JobContext, payload: WorkPayload) -> Any:
    _mark(ctx, "s", payload)
    result = await ctx.run("call", io_step, payload.order)
    _mark(ctx, "d", payload)
    return result


@job("bench.w_step3", queue="default", payload=WorkPayload, retry=RETRY, timeout=60)
async def w_step3(ctx: JobContext, payload: WorkPayload) -> Any:
    _mark(ctx, "s", payload)
    await ctx.run("first", io_step, payload.order)
    await ctx.run("second", io_step, payload.order)
    result = await ctx.run("third", io_step, payload.order)
    _mark(ctx, "d", payload)
    return result


@job("bench.w_sleep", queue="default", payload=WorkPayload, retry=RETRY, timeout=60)
async def w_sleep(ctx: JobContext, payload: WorkPayload) -> Any:
    _mark(ctx, "s", payload)
    await ctx.run("before", io_step, payload.order)
    await ctx.sleep(WORKLOADS["sleep"].sleep)
    result = await ctx.run("after", io_step, payload.order)
    _mark(ctx, "d", payload)
    return result

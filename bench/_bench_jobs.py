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

from jobyard.job_engine import Concurrency, JobContext, RetryPolicy, job

#: bench_fairness's concurrency limit per key.
FAIR_LIMIT = 2


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


class FairPayload(BaseModel):
    """bench_fairness: `out` is the file each run appends its line to; `at` its dispatch time."""

    out: str
    key: str
    at: float
    seconds: float = 0.0
    label: str = ""


def record_run(payload: FairPayload) -> None:
    import time

    began = time.time()
    if payload.seconds:
        time.sleep(payload.seconds)
    line = f"{payload.key} {payload.at} {began} {time.time()} {payload.label or '-'}\n"
    with open(payload.out, "a") as f:  # one short append: atomic
        f.write(line)


@job(
    "bench.fair", queue="default", payload=FairPayload, retry=RetryPolicy(attempts=1),
    concurrency=Concurrency(FAIR_LIMIT, key="key"),
)  # fmt: skip
async def fair(ctx: JobContext, payload: FairPayload) -> None:
    """bench_fairness: at most FAIR_LIMIT runs at once per key."""
    record_run(payload)


@job("bench.mark", queue="default", payload=FairPayload, retry=RetryPolicy(attempts=1))
async def mark_start(ctx: JobContext, payload: FairPayload) -> None:
    """bench_fairness: no limit; records when it ran (the priority part)."""
    record_run(payload)

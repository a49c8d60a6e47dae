"""Jobs only the benchmarks use (JOBYARD_JOB_MODULES=_bench_jobs, with bench/ on PYTHONPATH)."""

from __future__ import annotations

from typing import Any

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

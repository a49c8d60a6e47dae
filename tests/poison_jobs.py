"""Jobs of tests/test_poison_job.py: one that kills its worker process, and its neighbours.
Loaded through JOBYARD_JOB_MODULES=tests.jobs,tests.poison_jobs."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from jobyard.job_engine import JobContext, RetryPolicy, job
from tests.jobs import append_marker


class NeighbourPayload(BaseModel):
    marker_dir: str
    name: str
    seconds: float = 1.0


def work(directory: str, name: str, seconds: float) -> int:
    runs = append_marker(directory, name)
    time.sleep(seconds)
    return runs


def die(directory: str) -> None:
    """Counts its execution, then ends its process as a segfault or the OOM killer would: no
    exception, no clean-up."""
    append_marker(directory, "poison")
    os._exit(1)


@job("test.neighbour", payload=NeighbourPayload, retry=RetryPolicy(attempts=3, backoff=0.1))
async def neighbour(ctx: JobContext, payload: NeighbourPayload) -> int:
    return await ctx.run("work", work, payload.marker_dir, payload.name, payload.seconds)


class PoisonPayload(BaseModel):
    marker_dir: str


@job("test.poison", payload=PoisonPayload, retry=RetryPolicy(attempts=3, backoff=0.1))
async def poison(ctx: JobContext, payload: PoisonPayload) -> None:
    await ctx.run("die", die, payload.marker_dir)

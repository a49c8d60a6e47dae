"""Jobs of the Temporal flow-control tests (tests/test_flow_temporal.py), loaded through
JOBYARD_JOB_MODULES=tests.jobs,tests.flow_temporal_jobs: two queues of their own, and steps that
record when they ran."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel

from jobyard.job_engine import JobContext, RetryPolicy, job, queue

NARROW_CONCURRENCY = 2
queue("tq-narrow", concurrency=NARROW_CONCURRENCY, time_limit=120)
queue("tq-wide", concurrency=8, time_limit=120)


class SpanPayload(BaseModel):
    marker_dir: str
    label: str
    seconds: float = 0.0


def record_span(directory: str, label: str, seconds: float) -> int:
    """Appends `label start end pid` (wall clock) once the step has slept `seconds`."""
    started = time.time()
    time.sleep(seconds)
    line = f"{label} {started} {time.time()} {os.getpid()}\n"
    with (Path(directory) / "spans").open("a") as f:  # one short append: atomic
        f.write(line)
    return os.getpid()


@job("tq.narrow", queue="tq-narrow", payload=SpanPayload, retry=RetryPolicy(attempts=1))
async def narrow(ctx: JobContext, payload: SpanPayload) -> int:
    return await ctx.run("span", record_span, payload.marker_dir, payload.label, payload.seconds)


@job("tq.wide", queue="tq-wide", payload=SpanPayload, retry=RetryPolicy(attempts=1))
async def wide(ctx: JobContext, payload: SpanPayload) -> int:
    return await ctx.run("span", record_span, payload.marker_dir, payload.label, payload.seconds)

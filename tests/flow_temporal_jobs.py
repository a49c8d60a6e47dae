"""Jobs of the Temporal flow-control tests (tests/test_flow_temporal.py), loaded through
JOBYARD_JOB_MODULES=tests.jobs,tests.flow_temporal_jobs: queues of their own, jobs under keyed
limits, and steps that record when they ran."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel

from jobyard.job_engine import (
    Concurrency,
    Debounce,
    JobContext,
    RateLimit,
    RetryPolicy,
    job,
    queue,
)

NARROW_CONCURRENCY = 2
queue("tq-narrow", concurrency=NARROW_CONCURRENCY, time_limit=120)
queue("tq-wide", concurrency=8, time_limit=120)
#: Two steps at once per worker process, shared by every key of tq.slot.
queue("tq-pair", concurrency=2, time_limit=120)

RATE = RateLimit(2, 1.5, key="tenant")
SLOT = Concurrency(2, key="tenant")
ONE_SLOT = Concurrency(1, key="tenant")
QUIET = Debounce(3.0, key="tenant")


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


class TenantPayload(BaseModel):
    marker_dir: str
    label: str
    tenant: str
    seconds: float = 0.0


@job("tq.rated", queue="tq-wide", payload=TenantPayload, rate_limit=RATE,
     retry=RetryPolicy(attempts=1))  # fmt: skip
async def rated(ctx: JobContext, payload: TenantPayload) -> int:
    return await ctx.run("span", record_span, payload.marker_dir, payload.label, payload.seconds)


@job("tq.keyed", queue="tq-wide", payload=TenantPayload, concurrency=SLOT,
     retry=RetryPolicy(attempts=1))  # fmt: skip
async def keyed(ctx: JobContext, payload: TenantPayload) -> int:
    """Two steps with a durable sleep between: the run holds its slot across all of it."""
    await ctx.run("first", record_span, payload.marker_dir, payload.label, payload.seconds / 2)
    await ctx.sleep(1.5)  # longer than a third of the ttl: the leases are extended over it
    return await ctx.run("second", record_span, payload.marker_dir, payload.label,
                         payload.seconds / 2)  # fmt: skip


@job("tq.slot", queue="tq-pair", payload=TenantPayload, concurrency=ONE_SLOT,
     retry=RetryPolicy(attempts=1))  # fmt: skip
async def slot(ctx: JobContext, payload: TenantPayload) -> int:
    return await ctx.run("span", record_span, payload.marker_dir, payload.label, payload.seconds)


@job("tq.debounced", queue="tq-wide", payload=TenantPayload, debounce=QUIET,
     retry=RetryPolicy(attempts=1))  # fmt: skip
async def debounced(ctx: JobContext, payload: TenantPayload) -> int:
    return await ctx.run("span", record_span, payload.marker_dir, payload.label, payload.seconds)

"""Jobs of the flow-control tests on Dramatiq (tests/test_flow_dramatiq.py), each under a limit
keyed on its payload's `tenant` (or `doc`). Every run appends one line to `runs` in its
marker_dir: its permit's grant time (the permit store's clock), its own start and end (this
host's clock), its key, its label and its attempt. Loaded through
JOBYARD_JOB_MODULES=tests.jobs,tests.flow_jobs."""

from __future__ import annotations

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

FLOW_QUEUE = "flow"
#: One thread per process: a held job that kept its thread would stall the queue.
ONE_THREAD_QUEUE = "flow-one"
RATE_CALLS, RATE_PERIOD = 3, 1.0
CONCURRENCY = 2

queue(FLOW_QUEUE, concurrency=4, prefetch_factor=2, time_limit=60)
queue(ONE_THREAD_QUEUE, concurrency=1, prefetch_factor=4, time_limit=60)


class RunPayload(BaseModel):
    marker_dir: str
    tenant: str
    label: str = ""
    seconds: float = 0.0


class MaybeTenant(BaseModel):
    marker_dir: str
    tenant: str | int | None = None


class DocPayload(BaseModel):
    marker_dir: str
    doc: str
    value: int


def record(ctx: JobContext, directory: str, key: str, label: str, seconds: float) -> None:
    began = time.time()
    if seconds:
        time.sleep(seconds)
    line = f"{ctx.permit_at or 0.0} {began} {time.time()} {key} {label or '-'} {ctx.attempt}\n"
    with (Path(directory) / "runs").open("a") as f:  # one short append: atomic
        f.write(line)


@job(
    "test.flow_rate", queue=FLOW_QUEUE, payload=RunPayload, retry=RetryPolicy(attempts=1),
    rate_limit=RateLimit(RATE_CALLS, RATE_PERIOD, key="tenant"),
)  # fmt: skip
async def flow_rate(ctx: JobContext, payload: RunPayload) -> None:
    """At most RATE_CALLS starts per RATE_PERIOD per tenant."""
    record(ctx, payload.marker_dir, payload.tenant, payload.label, payload.seconds)


@job(
    "test.flow_slots", queue=FLOW_QUEUE, payload=RunPayload, retry=RetryPolicy(attempts=1),
    concurrency=Concurrency(CONCURRENCY, key="tenant"),
)  # fmt: skip
async def flow_slots(ctx: JobContext, payload: RunPayload) -> None:
    """At most CONCURRENCY runs at once per tenant."""
    record(ctx, payload.marker_dir, payload.tenant, payload.label, payload.seconds)


@job(
    "test.flow_one_slot", queue=ONE_THREAD_QUEUE, payload=RunPayload,
    retry=RetryPolicy(attempts=1), concurrency=Concurrency(1, key="tenant"),
)  # fmt: skip
async def flow_one_slot(ctx: JobContext, payload: RunPayload) -> None:
    """One run at a time per tenant, on a queue of one thread per process."""
    record(ctx, payload.marker_dir, payload.tenant, payload.label, payload.seconds)


@job("test.flow_free", queue=ONE_THREAD_QUEUE, payload=RunPayload, retry=RetryPolicy(attempts=1))
async def flow_free(ctx: JobContext, payload: RunPayload) -> None:
    """No limit, on the same one-thread queue."""
    record(ctx, payload.marker_dir, payload.tenant, payload.label, payload.seconds)


@job(
    "test.flow_debounce", queue=FLOW_QUEUE, payload=DocPayload, retry=RetryPolicy(attempts=1),
    debounce=Debounce(1.0, key="doc", max_wait=10.0),
)  # fmt: skip
async def flow_debounce(ctx: JobContext, payload: DocPayload) -> None:
    """One run per burst of dispatches of a doc, with the last one's value."""
    record(ctx, payload.marker_dir, payload.doc, str(payload.value), 0.0)


@job(
    "test.flow_maybe_keyed", queue=FLOW_QUEUE, payload=MaybeTenant, retry=RetryPolicy(attempts=1),
    concurrency=Concurrency(1, key="tenant"),
)  # fmt: skip
async def flow_maybe_keyed(ctx: JobContext, payload: MaybeTenant) -> None:
    """Keyed on a field its payload model lets be absent: such a payload is refused at
    dispatch."""

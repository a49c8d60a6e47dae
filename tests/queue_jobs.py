"""A job module that declares its own queue, as an app does: loaded through
JOBYARD_JOB_MODULES=tests.jobs,tests.queue_jobs by tests/test_queue_declaration.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel

from jobyard.job_engine import JobContext, RateLimit, RetryPolicy, job, queue

AI_CONCURRENCY = 3
queue("ai", concurrency=AI_CONCURRENCY, time_limit=120, rate_limit=RateLimit(60, 60.0))


class SpanPayload(BaseModel):
    marker_dir: str
    seconds: float = 0.0


def record_span(directory: str, seconds: float) -> int:
    """Appends this run's start and end (monotonic-free wall times, one line) and its pid."""
    started = time.time()
    time.sleep(seconds)
    line = f"{started} {time.time()} {os.getpid()}\n"
    with (Path(directory) / "spans").open("a") as f:  # one short append: atomic
        f.write(line)
    return os.getpid()


@job("test.ai_span", queue="ai", payload=SpanPayload, retry=RetryPolicy(attempts=1))
async def ai_span(ctx: JobContext, payload: SpanPayload) -> int:
    """Records when it ran, on the `ai` queue this module declared above."""
    return await ctx.run("span", record_span, payload.marker_dir, payload.seconds)

"""Schedules that exist only for the schedule tests; loaded through
JOBYARD_JOB_MODULES=tests.jobs,tests.schedule_jobs with SCHEDULE_TEST_DIR set (each job appends
one line per run there, so a test counts runs, duplicates included)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from jobyard.job_engine import RetryPolicy, job, schedule


def record_run(name: str, job_id: str) -> float:
    """Append `job_id started-at` to `$SCHEDULE_TEST_DIR/name`; returns the start time."""
    started = time.time()
    with (Path(os.environ["SCHEDULE_TEST_DIR"]) / name).open("a") as f:
        f.write(f"{job_id} {started:.6f}\n")
    return started


def block(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


class TickPayload(BaseModel):
    record: str
    seconds: float = 0.0


@job(
    "test.schedule_tick",
    queue="scheduled",
    payload=TickPayload,
    retry=RetryPolicy(attempts=3, backoff=0.1),
    timeout=30,
)
async def schedule_tick(ctx: Any, payload: TickPayload) -> float:
    started = await ctx.run("record", record_run, payload.record, ctx.job_id)
    if payload.seconds:
        await ctx.run("block", block, payload.seconds)
    return started


schedule(
    "test.every2",
    "test.schedule_tick",
    every=2,
    overlap="allow_all",  # counted for exactly-once, not for overlap
    payload={"record": "every2.log"},
)
schedule(
    "test.window",
    "test.schedule_tick",
    every=2,
    catchup_window=10,
    overlap="allow_all",
    payload={"record": "window.log"},
)
schedule(
    "test.overlap",
    "test.schedule_tick",
    every=2,
    payload={"record": "overlap.log", "seconds": 5},
)

"""Jobs of the soak (`make soak`, tests/faults/soak.py); its workers load this module through
JOBYARD_JOB_MODULES beside tests.faults.jobs and tests.faults.poison.

Every step execution writes START then END (or FAIL) to the same append-only ledger as the fault
rows (tests/faults/jobs.py), so the soak counts lost jobs, double runs and re-run returned steps
the way `make chaos` does. A step that fails once remembers it in a marker file of its own, not
by reading the ledger (which grows to tens of megabytes in an hour).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from jobyard.job_engine import RetryPolicy, job, queue, schedule
from tests.faults.jobs import ENGINE_ENV, _append

#: The ledger and the marker folder, for the scheduled job (a schedule's payload is fixed at
#: import) and the fail-once steps; the soak sets them on every process it starts.
LEDGER_ENV = "JOBYARD_SOAK_LEDGER"
MARKERS_ENV = "JOBYARD_SOAK_MARKERS"

#: No Dramatiq worker listens to this queue: its jobs go to Temporal (dispatch contract step 4).
TEMPORAL_QUEUE = "soak-temporal"
SCHEDULE = "soak.every5"
TICK_EVERY = 5.0

#: The queue of the witness worker, a `jobyard worker` no fault restarts: its RSS over the hour
#: is the growth target (a restarted worker's memory starts again from nothing).
WITNESS_QUEUE = "soak-witness"

queue(TEMPORAL_QUEUE, concurrency=10, time_limit=120, max_attempts=5)
queue(WITNESS_QUEUE, concurrency=10, time_limit=120, max_attempts=5)


def soak_step(ledger: str, tag: str, job_id: str, step: str, work: float, mode: str) -> str:
    """START, `work` seconds of sliced sleeping, END. `mode` "fail_once": the first execution of
    this step of this job raises (FAIL line); "fail": every execution raises."""
    engine = os.environ.get(ENGINE_ENV, "unknown")
    base = {"tag": tag, "job": job_id, "step": step, "pid": os.getpid(), "engine": engine}
    _append(ledger, {"ev": "START", "t": time.time(), **base})
    until = time.monotonic() + work
    while (left := until - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
    if mode == "fail" or (mode == "fail_once" and _first_failure(job_id, step)):
        _append(ledger, {"ev": "FAIL", "t": time.time(), **base})
        raise RuntimeError(f"{step} of {tag} fails on purpose ({mode})")
    _append(ledger, {"ev": "END", "t": time.time(), **base})
    return step


def _first_failure(job_id: str, step: str) -> bool:
    """True once per (job, step): the marker file is created by exactly one execution."""
    marker = Path(os.environ[MARKERS_ENV]) / f"{job_id}.{step}".replace("/", "_")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


class SoakPayload(BaseModel):
    ledger: str
    tag: str
    steps: int = 3
    work: float = 0.02  # seconds each step takes
    sleep: float = 0.0  # a durable ctx.sleep after the first step
    fail_step: int = -1  # index of the step that fails (`fail_mode`)
    fail_mode: str = "fail_once"


async def _plan(ctx: Any, p: SoakPayload) -> int:
    for i in range(p.steps):
        mode = p.fail_mode if i == p.fail_step else "ok"
        await ctx.run(f"s{i}", soak_step, p.ledger, p.tag, ctx.job_id, f"s{i}", p.work, mode)
        if i == 0 and p.sleep:
            await ctx.sleep(p.sleep)
    return p.steps


@job("soak.chain", payload=SoakPayload, retry=RetryPolicy(attempts=3, backoff=0.2), timeout=60)
async def chain(ctx: Any, payload: SoakPayload) -> int:
    return await _plan(ctx, payload)


@job("soak.fail", payload=SoakPayload, retry=RetryPolicy(attempts=2, backoff=0.1), timeout=60)
async def fail(ctx: Any, payload: SoakPayload) -> int:
    """Ends `dead` after two attempts: the load's failures."""
    return await _plan(ctx, payload)


@job(
    "soak.temporal",
    queue=TEMPORAL_QUEUE,
    payload=SoakPayload,
    retry=RetryPolicy(attempts=3, backoff=0.2),
    timeout=60,
)
async def on_temporal(ctx: Any, payload: SoakPayload) -> int:
    return await _plan(ctx, payload)


@job(
    "soak.witness",
    queue=WITNESS_QUEUE,
    payload=SoakPayload,
    retry=RetryPolicy(attempts=3, backoff=0.2),
    timeout=60,
)
async def on_witness(ctx: Any, payload: SoakPayload) -> int:
    return await _plan(ctx, payload)


class TickPayload(BaseModel):
    work: float = 0.02


@job("soak.tick", queue="scheduled", payload=TickPayload, retry=RetryPolicy(attempts=3))
async def tick(ctx: Any, payload: TickPayload) -> str:
    """The scheduled job: one ledger step tagged with its own (tick) job id."""
    ledger = os.environ[LEDGER_ENV]
    args = (ledger, ctx.job_id, ctx.job_id, "s0", payload.work, "ok")
    step: str = await ctx.run("s0", soak_step, *args)
    return step


schedule(SCHEDULE, "soak.tick", every=TICK_EVERY, overlap="allow_all", catchup_window=60)

"""Jobs of the fault suite; loaded through JOBYARD_JOB_MODULES=tests.faults.jobs.

Every execution of every step appends a START line before its work and an END line after it to
an append-only ledger (one os.write on an O_APPEND descriptor per line, so concurrent processes
never interleave a line). A START with no END is an execution that was interrupted; a START after
an END of the same step is a step that ran again although its function had returned.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from pydantic import BaseModel

from jobyard.job_engine import RetryPolicy, job

#: Which engine's process runs a step: the harness sets it on the processes it starts.
ENGINE_ENV = "JOBYARD_FAULTS_ENGINE"


def _append(ledger: str, line: dict[str, Any]) -> None:
    data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _ran_before(ledger: str, tag: str, step: str) -> bool:
    needle = f'"tag":"{tag}","job"'
    with open(ledger) as f:
        return any(needle in line and f'"step":"{step}"' in line for line in f)


def ledger_step(
    ledger: str,
    tag: str,
    job_id: str,
    step: str,
    work: float,
    fail_once: bool = False,
    only_on: str = "",
    blocking: bool = False,
) -> dict[str, Any]:
    """A step whose side effect is the ledger itself: START, `work` seconds, END. With
    `fail_once` its first execution raises after its work (a FAIL line instead of END); with
    `only_on` it takes `work` on that engine only (a step to be caught mid-way there) and
    0.05 s elsewhere; with `blocking` the work is one time.sleep, a call blocked in C as a
    hung socket read is."""
    engine = os.environ.get(ENGINE_ENV, "unknown")
    base = {"tag": tag, "job": job_id, "step": step, "pid": os.getpid(), "engine": engine}
    fail = fail_once and not _ran_before(ledger, tag, step)
    if only_on and engine != only_on:
        work = min(work, 0.05)
    _append(ledger, {"ev": "START", "t": time.time(), **base})
    # Short slices, as real Python work is: an engine's time limit (an exception raised in this
    # thread) can only land between them.
    if blocking:
        time.sleep(work)
    else:
        until = time.monotonic() + work
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
    if fail:
        _append(ledger, {"ev": "FAIL", "t": time.time(), **base})
        raise RuntimeError(f"{step} of {tag}: the first execution fails on purpose")
    _append(ledger, {"ev": "END", "t": time.time(), **base})
    return {"pid": base["pid"]}


class ChainPayload(BaseModel):
    ledger: str
    tag: str
    steps: int = 3
    work: float = 0.1  # seconds each step takes
    long_step: int = -1  # index of a step that takes `long_work` instead
    long_work: float = 0.0
    sleep: float = 0.0  # a durable ctx.sleep after the first step (> 1 s parks on Dramatiq)
    blob: str = ""  # ballast, to make a payload large
    fail_once: int = -1  # index of a step whose first execution raises
    long_only_on: str = ""  # the long step is long on this engine only ("" = on both)


@job("faults.chain", payload=ChainPayload, retry=RetryPolicy(attempts=8, backoff=0.2), timeout=60)
async def chain(ctx: Any, payload: ChainPayload) -> int:
    for i in range(payload.steps):
        work = payload.long_work if i == payload.long_step else payload.work
        only_on = payload.long_only_on if i == payload.long_step else ""
        args = (payload.ledger, payload.tag, ctx.job_id, f"s{i}", work, i == payload.fail_once)
        await ctx.run(f"s{i}", ledger_step, *args, only_on)
        if i == 0 and payload.sleep:
            await ctx.sleep(payload.sleep)
    return payload.steps


class OverrunPayload(BaseModel):
    ledger: str
    tag: str
    work: float
    blocking: bool = False


@job(
    "faults.overrun", payload=OverrunPayload, retry=RetryPolicy(attempts=2, backoff=0.1), timeout=2
)
async def overrun(ctx: Any, payload: OverrunPayload) -> str:
    """A step that takes longer than the job's timeout: it must be interrupted."""
    args = (payload.ledger, payload.tag, ctx.job_id, "s0", payload.work, False, "")
    await ctx.run("s0", ledger_step, *args, payload.blocking)
    return "overran"


class CanaryPayload(BaseModel):
    ledger: str
    tag: str


@job("faults.canary", payload=CanaryPayload, retry=RetryPolicy(attempts=3, backoff=0.1), timeout=10)
async def canary(ctx: Any, payload: CanaryPayload) -> str:
    await ctx.run("s0", ledger_step, payload.ledger, payload.tag, ctx.job_id, "s0", 0.0)
    return "ok"

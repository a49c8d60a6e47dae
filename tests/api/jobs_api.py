"""Jobs for the API tests; workers load them with JOBYARD_JOB_MODULES=tests.jobs,tests.api.jobs_api.

Each job leaves marker files in `marker_dir` (one line per execution of a step), so a test can
tell what really ran, on either engine, without trusting the engine's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from jobyard.job_engine import RetryPolicy, job

#: api.needs_setting refuses to dispatch while this variable is unset.
REQUIRED_SETTING = "JOBYARD_TEST_API_REQUIRED_SETTING"
#: api.flaky fails until a file of this name exists in its marker_dir.
ALLOW_FILE = "allow"


def mark_and_wait(directory: str, name: str, seconds: float) -> int:
    """Record one execution of step `name`, then take `seconds`; returns how often it ran."""
    path = Path(directory) / name
    with path.open("a") as f:
        f.write("ran\n")
    time.sleep(seconds)
    return len(path.read_text().splitlines())


def fail_unless_allowed(directory: str) -> str:
    mark_and_wait(directory, "check", 0)
    if not (Path(directory) / ALLOW_FILE).exists():
        raise RuntimeError(f"not allowed yet: create {ALLOW_FILE} in {directory}")
    return "allowed"


class StepsPayload(BaseModel):
    marker_dir: str
    steps: int = Field(3, ge=1, le=20)
    seconds: float = Field(0.5, ge=0)


@job("api.steps", payload=StepsPayload, retry=RetryPolicy(attempts=1), timeout=60)
async def steps(ctx: Any, payload: StepsPayload) -> dict[str, int]:
    """Runs `steps` steps of `seconds` each and reports progress after each one."""
    for index in range(payload.steps):
        await ctx.run(f"step-{index}", mark_and_wait, payload.marker_dir, f"step-{index}",
                      payload.seconds)  # fmt: skip
        await ctx.progress((index + 1) / payload.steps)
    return {"steps": payload.steps}


class FlakyPayload(BaseModel):
    marker_dir: str


@job("api.flaky", payload=FlakyPayload, retry=RetryPolicy(attempts=2, backoff=0.1), timeout=30)
async def flaky(ctx: Any, payload: FlakyPayload) -> dict[str, Any]:
    """Dies (2 attempts) until ALLOW_FILE exists; a replay after that succeeds."""
    prepared = await ctx.run("prepare", mark_and_wait, payload.marker_dir, "prepare", 0)
    checked = await ctx.run("check", fail_unless_allowed, payload.marker_dir)
    return {"prepared": prepared, "checked": checked}


class NeedsSettingPayload(BaseModel):
    value: int = 0


@job("api.needs_setting", payload=NeedsSettingPayload, requires_env=(REQUIRED_SETTING,))
async def needs_setting(ctx: Any, payload: NeedsSettingPayload) -> int:
    """Cannot be dispatched unless REQUIRED_SETTING is set."""
    return payload.value


class OddResultPayload(BaseModel):
    pass


@job("api.odd_result", payload=OddResultPayload, retry=RetryPolicy(attempts=1), timeout=10)
async def odd_result(ctx: Any, payload: OddResultPayload) -> dict[str, Any]:
    """A result no strict JSON encoder writes: a lone surrogate and NaN. Stored values like this
    must not break a listing or the job's own page."""
    return {"text": "\udc00", "number": float("nan")}


class NapPayload(BaseModel):
    marker_dir: str
    nap: float = Field(4.0, ge=0)


@job("api.nap", payload=NapPayload, retry=RetryPolicy(attempts=1), timeout=60)
async def nap(ctx: Any, payload: NapPayload) -> dict[str, int]:
    """A step, progress 0.5, a durable sleep (parked on Dramatiq, a timer on Temporal), a
    second step, progress 1.0: a job that can move engines while it sleeps."""
    first = await ctx.run("first", mark_and_wait, payload.marker_dir, "first", 0)
    await ctx.progress(0.5)
    await ctx.sleep(payload.nap)
    second = await ctx.run("second", mark_and_wait, payload.marker_dir, "second", 0)
    await ctx.progress(1.0)
    return {"first": first, "second": second}


@job("api.retry_later", payload=FlakyPayload, retry=RetryPolicy(attempts=2, backoff=6), timeout=30)
async def retry_later(ctx: Any, payload: FlakyPayload) -> str:
    """Fails its step once ALLOW_FILE is missing, and waits 6 s before the next try."""
    result: str = await ctx.run("check", fail_unless_allowed, payload.marker_dir)
    return result


class ChattyPayload(BaseModel):
    reports: int = Field(20, ge=1, le=100)
    fail_first: bool = True


@job("api.chatty", payload=ChattyPayload, retry=RetryPolicy(attempts=2, backoff=0.1), timeout=30)
async def chatty(ctx: Any, payload: ChattyPayload) -> dict[str, int]:
    """Reports progress `reports` times within 100 ms on each attempt; the first attempt then
    fails (with `fail_first`), the retry succeeds: far faster than the job log's shipping
    interval."""
    for n in range(1, payload.reports + 1):
        await ctx.progress(n / payload.reports)
        await asyncio.sleep(0.1 / payload.reports / 2)
    if payload.fail_first and ctx.attempt == 1:
        raise RuntimeError("the first attempt fails")
    return {"attempt": ctx.attempt}


class FanPayload(BaseModel):
    n: int = Field(3, ge=1, le=50)


@job("api.fan", payload=FanPayload, retry=RetryPolicy(attempts=1), timeout=30)
async def fan(ctx: Any, payload: FanPayload) -> list[Any]:
    """Starts `n` system.echo children and returns their results."""
    return await ctx.children([("system.echo", {"i": i}) for i in range(payload.n)])


class GatePayload(BaseModel):
    marker_dir: str


def wait_for_allow(marker_dir: str) -> bool:
    """True once the file ALLOW_FILE exists in marker_dir (False after 60 s)."""
    deadline = time.monotonic() + 60
    while not (Path(marker_dir) / ALLOW_FILE).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@job("api.gate", payload=GatePayload, retry=RetryPolicy(attempts=1), timeout=90)
async def gate(ctx: Any, payload: GatePayload) -> bool:
    return await ctx.run("gate", wait_for_allow, payload.marker_dir)


@job("api.gated_parent", payload=GatePayload, retry=RetryPolicy(attempts=1), timeout=30)
async def gated_parent(ctx: Any, payload: GatePayload) -> Any:
    """Waits for one api.gate child: it parks until the child's file appears."""
    return await ctx.child("api.gate", {"marker_dir": payload.marker_dir})

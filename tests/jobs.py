"""Jobs that exist only for tests; loaded through JOBYARD_JOB_MODULES=tests.jobs."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from jobyard.job_engine import JobContext, RetryPolicy, job


def append_marker(directory: str, name: str) -> int:
    """Record one execution of a step; returns how many times it has run."""
    path = Path(directory) / name
    with path.open("a") as f:
        f.write("ran\n")
    return len(path.read_text().splitlines())


def block(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


class TwoStepsPayload(BaseModel):
    marker_dir: str
    sleep: float = 3.0


@job(
    "test.two_steps",
    payload=TwoStepsPayload,
    retry=RetryPolicy(attempts=3, backoff=0.1),
    timeout=20,
)
async def two_steps(ctx: JobContext, payload: TwoStepsPayload) -> dict[str, int]:
    first = await ctx.run("first", append_marker, payload.marker_dir, "first")
    await ctx.sleep(payload.sleep)
    second = await ctx.run("second", append_marker, payload.marker_dir, "second")
    return {"first": first, "second": second}


class SlowPayload(BaseModel):
    seconds: float
    marker_dir: str | None = None


@job("test.slow", payload=SlowPayload, retry=RetryPolicy(attempts=3, backoff=0.1), timeout=60)
async def slow(ctx: JobContext, payload: SlowPayload) -> float:
    if payload.marker_dir:
        await ctx.run("started", append_marker, payload.marker_dir, "started")
    return await ctx.run("block", block, payload.seconds)


def block_first_time(directory: str, seconds: float) -> int:
    """Blocks `seconds` on its first execution only, so a requeued run finishes quickly."""
    runs = append_marker(directory, "block")
    if runs == 1:
        time.sleep(seconds)
    return runs


class StubbornPayload(BaseModel):
    marker_dir: str
    seconds: float = 60.0


@job(
    "test.stubborn",
    payload=StubbornPayload,
    retry=RetryPolicy(attempts=3, backoff=0.1),
    timeout=120,
)
async def stubborn(ctx: JobContext, payload: StubbornPayload) -> int:
    return await ctx.run("block", block_first_time, payload.marker_dir, payload.seconds)


def fail_unless_fixed(directory: str) -> str:
    """Fails until a file named `fixed` appears: a job that dies, then succeeds on replay."""
    append_marker(directory, "tries")
    if not (Path(directory) / "fixed").exists():
        raise RuntimeError("the downstream service is broken")
    return "fixed"


def wait_for_file(directory: str, name: str, timeout: float) -> bool:
    path = Path(directory) / name
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


class MarkerPayload(BaseModel):
    marker_dir: str


@job("test.fragile", payload=MarkerPayload, retry=RetryPolicy(attempts=2, backoff=0.1), timeout=20)
async def fragile(ctx: JobContext, payload: MarkerPayload) -> str:
    await ctx.run("prepare", append_marker, payload.marker_dir, "prepare")
    return await ctx.run("call", fail_unless_fixed, payload.marker_dir)


@job("test.progress", payload=MarkerPayload, retry=RetryPolicy(attempts=1), timeout=60)
async def progress(ctx: JobContext, payload: MarkerPayload) -> str:
    """Reports half-way, then waits until the test creates `go`."""
    await ctx.run("first-half", append_marker, payload.marker_dir, "first-half")
    await ctx.progress({"done": 1, "of": 2})
    await ctx.run("wait", wait_for_file, payload.marker_dir, "go", 30)
    await ctx.progress(1.0)
    return "done"


@job("test.orchestration_bug", payload=MarkerPayload, retry=RetryPolicy(attempts=3), timeout=20)
async def orchestration_bug(ctx: JobContext, payload: MarkerPayload) -> str:
    """Fails in the handler's own code, not in a step."""
    await ctx.run("prepare", append_marker, payload.marker_dir, "prepare")
    return {"a": 1}["missing"]


class NapPayload(BaseModel):
    marker_dir: str
    seconds: float


@job("test.nap", payload=NapPayload, retry=RetryPolicy(attempts=1), timeout=60)
async def nap(ctx: JobContext, payload: NapPayload) -> int:
    """A job without steps: counts its executions, then blocks for `seconds`."""
    runs = append_marker(payload.marker_dir, "nap")
    time.sleep(payload.seconds)
    return runs


class CountPayload(BaseModel):
    marker_dir: str
    key: str


@job("test.count", payload=CountPayload, retry=RetryPolicy(attempts=3, backoff=0.1), timeout=20)
async def count(ctx: JobContext, payload: CountPayload) -> int:
    """One line in `marker_dir/key` per execution of its one step (tests count executions)."""
    return await ctx.run("mark", append_marker, payload.marker_dir, payload.key)

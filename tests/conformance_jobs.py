"""The handlers of the ctx conformance suite (tests/test_ctx_conformance.py): each engine runs these
same jobs. Loaded through JOBYARD_JOB_MODULES=tests.conformance_jobs in worker processes.

Every step appends a line to a file named after it in `marker_dir`, so a test counts executions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from jobyard.job_engine import ChildFailedError, JobContext, PermanentError, RetryPolicy, job
from tests.jobs import append_marker

RETRY = RetryPolicy(attempts=3, backoff=0.1)


class Markers(BaseModel):
    marker_dir: str


class SleepPayload(Markers):
    seconds: float


class ChildPayload(Markers):
    n: int
    fail: bool = False
    seconds: float = 0.0  # how long its step takes


class FanOutPayload(Markers):
    count: int
    seconds: float = 0.0  # how long each child's step takes


def fails_first_time(directory: str, name: str) -> int:
    runs = append_marker(directory, name)
    if runs == 1:
        raise RuntimeError(f"{name}: the first try fails")
    return runs


def pair(directory: str, left: Any, right: Any) -> tuple[Any, Any]:
    """Returns a tuple: what comes back from ctx.run is its JSON form, a list, on every engine."""
    append_marker(directory, "pair")
    return left, right


def refuse(directory: str) -> None:
    append_marker(directory, "refuse")
    raise PermanentError("the card was declined")


def tick(directory: str, seconds: float) -> float:
    """Runs `seconds` in short sleeps, so that a Dramatiq time limit can interrupt it."""
    append_marker(directory, "tick")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    append_marker(directory, "ticked")
    return seconds


def wait_for_go(directory: str, timeout: float) -> bool:
    append_marker(directory, "waiting")
    go, deadline = Path(directory) / "go", time.monotonic() + timeout
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return go.exists()


def a_set(directory: str) -> set[int]:
    append_marker(directory, "a_set")
    return {1, 2}


@job("conformance.steps", payload=Markers, retry=RETRY, timeout=20)
async def steps(ctx: JobContext, payload: Markers) -> dict[str, Any]:
    """`first` succeeds, `flaky` fails once: after it, attempt is 2 and `first` ran once."""
    first = await ctx.run("first", append_marker, payload.marker_dir, "first")
    flaky = await ctx.run("flaky", fails_first_time, payload.marker_dir, "flaky")
    both = await ctx.run("pair", pair, payload.marker_dir, first, {"n": flaky})
    return {
        "first": first,
        "flaky": flaky,
        "pair": both,
        "attempt": ctx.attempt,
        "job_id": ctx.job_id,
        "job_name": ctx.job_name,
        "key": ctx.step_key("flaky"),
    }


@job("conformance.sleep", payload=SleepPayload, retry=RETRY, timeout=20)
async def sleeps(ctx: JobContext, payload: SleepPayload) -> dict[str, Any]:
    before = await ctx.run("before", append_marker, payload.marker_dir, "before")
    await ctx.sleep(payload.seconds)
    after = await ctx.run("after", append_marker, payload.marker_dir, "after")
    return {"before": before, "after": after, "attempt": ctx.attempt}


@job("conformance.progress", payload=Markers, retry=RETRY, timeout=20)
async def progress(ctx: JobContext, payload: Markers) -> str:
    await ctx.run("first", append_marker, payload.marker_dir, "first")
    await ctx.progress({"done": 1, "of": 2})
    await ctx.run("wait", wait_for_go, payload.marker_dir, 15)
    await ctx.progress(1.0)
    return "done"


@job("conformance.permanent", payload=Markers, retry=RETRY, timeout=20)
async def permanent(ctx: JobContext, payload: Markers) -> None:
    await ctx.run("first", append_marker, payload.marker_dir, "first")
    await ctx.run("refuse", refuse, payload.marker_dir)


@job("conformance.timeout", payload=Markers, retry=RetryPolicy(attempts=1), timeout=1)
async def times_out(ctx: JobContext, payload: Markers) -> float:
    return await ctx.run("tick", tick, payload.marker_dir, 10)


@job("conformance.cancel", payload=Markers, retry=RETRY, timeout=20)
async def cancellable(ctx: JobContext, payload: Markers) -> str:
    await ctx.run("first", append_marker, payload.marker_dir, "first")
    await ctx.run("wait", wait_for_go, payload.marker_dir, 15)
    await ctx.run("after", append_marker, payload.marker_dir, "after")
    return "not cancelled"


@job("conformance.duplicate", payload=Markers, retry=RETRY, timeout=20)
async def duplicate(ctx: JobContext, payload: Markers) -> None:
    await ctx.run("same", append_marker, payload.marker_dir, "one")
    await ctx.run("same", append_marker, payload.marker_dir, "two")


@job("conformance.closure", payload=Markers, retry=RETRY, timeout=20)
async def closure(ctx: JobContext, payload: Markers) -> None:
    await ctx.run("first", append_marker, payload.marker_dir, "first")

    def local(directory: str) -> int:
        return append_marker(directory, "local")

    await ctx.run("local", local, payload.marker_dir)


@job("conformance.not_json", payload=Markers, retry=RETRY, timeout=20)
async def not_json(ctx: JobContext, payload: Markers) -> None:
    await ctx.run("a_set", a_set, payload.marker_dir)


def child_step(directory: str, n: int, fail: bool, seconds: float = 0.0) -> int:
    time.sleep(seconds)
    append_marker(directory, f"child-{n}")
    if fail:
        raise PermanentError(f"child {n} refuses")
    return n * 10


def child_calls(
    directory: str, numbers: list[int], fail: tuple[int, ...] = (), seconds: float = 0.0
) -> list[Any]:
    return [
        (
            "conformance.child",
            {"marker_dir": directory, "n": n, "fail": n in fail, "seconds": seconds},
        )
        for n in numbers
    ]


@job("conformance.child", payload=ChildPayload, retry=RETRY, timeout=20)
async def child(ctx: JobContext, payload: ChildPayload) -> int:
    return await ctx.run(
        "work", child_step, payload.marker_dir, payload.n, payload.fail, payload.seconds
    )


@job("conformance.fan_out", payload=FanOutPayload, retry=RETRY, timeout=20)
async def fan_out(ctx: JobContext, payload: FanOutPayload) -> dict[str, Any]:
    """Fans out `count` children, then one keyed child; `after` fails once, so on Dramatiq the
    parent runs again from the top past both fan-ins: no child may start twice."""
    directory = payload.marker_dir
    await ctx.run("before", append_marker, directory, "before")
    numbers = list(range(payload.count))
    results = await ctx.children(child_calls(directory, numbers, seconds=payload.seconds))
    await ctx.run("resumed", append_marker, directory, "resumed")
    single = await ctx.child("conformance.child", {"marker_dir": directory, "n": 100}, key="one")
    after = await ctx.run("after", fails_first_time, directory, "after")
    return {"results": results, "single": single, "after": after, "attempt": ctx.attempt}


@job("conformance.child_fails", payload=Markers, retry=RETRY, timeout=20)
async def child_fails(ctx: JobContext, payload: Markers) -> dict[str, Any]:
    """A failed child raises ChildFailedError, which the parent catches; with
    return_exceptions the failure takes the child's place."""
    directory = payload.marker_dir
    try:
        await ctx.child("conformance.child", {"marker_dir": directory, "n": 1, "fail": True})
        caught: dict[str, Any] = {}
    except ChildFailedError as exc:
        caught = {"job_id": exc.job_id, "state": exc.state, "error": exc.error}
    mixed = await ctx.children(child_calls(directory, [2, 3], fail=(3,)), return_exceptions=True)
    shown = [r.state if isinstance(r, ChildFailedError) else r for r in mixed]
    await ctx.run("after", append_marker, directory, "after")
    return {"caught": caught, "mixed": shown}


@job("conformance.child_fails_parent", payload=Markers, retry=RETRY, timeout=20)
async def child_fails_parent(ctx: JobContext, payload: Markers) -> None:
    """Uncaught, a failed child fails the parent (once: a ChildFailedError is not retried)."""
    await ctx.children(child_calls(payload.marker_dir, [1, 2], fail=(2,)))
    await ctx.run("after", append_marker, payload.marker_dir, "after")


@job("conformance.too_many_children", payload=FanOutPayload, retry=RETRY, timeout=20)
async def too_many_children(ctx: JobContext, payload: FanOutPayload) -> None:
    await ctx.children(child_calls(payload.marker_dir, list(range(payload.count))))


@job("conformance.bad_child", payload=Markers, retry=RETRY, timeout=20)
async def bad_child(ctx: JobContext, payload: Markers) -> None:
    """The second child's payload is invalid: none starts, the parent fails at once."""
    directory = payload.marker_dir
    good = {"marker_dir": directory, "n": 1}
    await ctx.children([("conformance.child", good), ("conformance.child", {"n": "x"})])

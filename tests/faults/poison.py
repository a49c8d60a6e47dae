"""The `make chaos` row of issue 29's first fault: a job whose step kills its worker process
(`os._exit`, as a segfault or the OOM killer would) among normal jobs on the same queue.

Its workers load this module too (JOBYARD_JOB_MODULES), for the poison job."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from pydantic import BaseModel

from jobyard.job_engine import RetryPolicy, job
from tests.faults.jobs import ENGINE_ENV, _append
from tests.faults.scenarios import (
    Harness,
    Load,
    Row,
    _timed,
    finish,
    say,
    status_of,
    wait_final,
)
from tests.support import wait_for

POISON_ATTEMPTS = 3
JOB_MODULES = "tests.faults.jobs,tests.faults.poison"


class PoisonPayload(BaseModel):
    ledger: str
    tag: str


def die(ledger: str, tag: str, job_id: str) -> None:
    """A START line in the ledger, then the end of the process: no END, no exception."""
    engine = os.environ.get(ENGINE_ENV, "unknown")
    base = {"tag": tag, "job": job_id, "step": "die", "pid": os.getpid(), "engine": engine}
    _append(ledger, {"ev": "START", "t": time.time(), **base})
    os._exit(1)


@job(
    "faults.poison",
    payload=PoisonPayload,
    retry=RetryPolicy(attempts=POISON_ATTEMPTS, backoff=0.2),
    timeout=60,
)
async def poison(ctx: Any, payload: PoisonPayload) -> None:
    await ctx.run("die", die, payload.ledger, payload.tag, ctx.job_id)


@_timed
def poison_job(h: Harness, n: int = 200, before: int = 10, work: float = 0.2) -> Row:
    """The poison dispatched after `before` normal jobs (running beside it when it first kills its
    process), the rest after it."""
    ledger = h.ledger("poison")
    cluster = h.cluster(aof=True, env={"JOBYARD_JOB_MODULES": JOB_MODULES})
    try:
        cluster.start_both()
        say("workers up")
        load = Load(ledger, steps=2, work=work)
        load.dispatch_many([f"j{i}" for i in range(before)])
        poisoned_at = time.monotonic()
        poison_id = Load(ledger, job="faults.poison").dispatch("poison").job_id
        assert poison_id is not None
        load.dispatch_many([f"j{i}" for i in range(before, n)])
        timeout = float(cluster.env["WORKER_HEARTBEAT_TIMEOUT"])
        bound = POISON_ATTEMPTS * timeout + 10
        with contextlib.suppress(AssertionError):  # the row says what it was
            wait_for(lambda: _state(poison_id) == "dead", timeout=bound + h.settle)
        dead_s = time.monotonic() - poisoned_at
        status = status_of(poison_id)  # None if it cannot be read (the row says so)
        state, error = (status.state, status.error) if status else ("unreadable", None)
        say(f"poison {state} after {dead_s:.1f} s: {error}")
        final = wait_final(load.accepted(), h.settle)
        row = finish("a job that kills its worker process", load, final)
        histories = ledger.histories()
        poison_runs = len(histories.get("poison", {}).get("die", _NoRuns).executions)
        cut = [
            sum(1 for e in history.executions if e.ended is None)
            for tag, steps in histories.items()
            if tag != "poison"
            for history in steps.values()
        ]
        row.extra["poison_runs"] = poison_runs
        row.extra["poison_state"] = state
        row.extra["poison_dead_s"] = round(dead_s, 1)
        row.extra["normal_succeeded"] = sum(1 for s in final.values() if s.state == "succeeded")
        row.extra["normal_steps_cut"] = sum(cut)
        row.extra["normal_cut_max"] = max(cut, default=0)
        row.require(poison_runs <= POISON_ATTEMPTS, f"the poison runs at most {POISON_ATTEMPTS}x")
        row.require(
            state == "dead" and dead_s <= bound,
            f"the poison is dead within {bound:g} s",
        )
        row.require(
            error is not None and "WorkerProcessDied" in error,
            "its error says its process died",
        )
        row.require(row.extra["normal_succeeded"] == n, f"all {n} normal jobs succeed")
        row.require(row.extra["normal_cut_max"] <= 1, "no normal job's step is cut twice")
        return row
    finally:
        cluster.close()


def _state(job_id: str) -> str | None:
    """The job's state; None while it cannot be read (a Redis timeout on a loaded machine)."""
    status = status_of(job_id)
    return status.state if status else None


class _NoRuns:
    executions: list[Any] = []


ROWS = [(poison_job, {"n": 200})]

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
    RULE_3,
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
        deaths = {
            e.pid: e.started for e in histories.get("poison", {}).get("die", _NoRuns).executions
        }
        normal = [h for tag, steps in histories.items() if tag != "poison" for h in steps.values()]
        cut = [len(_cuts(history, deaths)) for history in normal]
        at_death = sum(1 for h in normal for e in _cuts(h, deaths) if e.ended is not None)
        if at_death and row.rerun_returned == at_death:
            # Returned in the very moment the poison killed their process, their results died
            # with it before they were recorded: cut like the steps still running, and allowed
            # once each (the "cut at most once"). Any other returned re-run still counts.
            row.missed.remove(RULE_3)
        row.extra["returned_as_process_died"] = at_death
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


#: How close to its process's death a step's return must be for its result to count as lost
#: with the process (a cut), not as recorded: recording takes well under a millisecond.
DEATH_WINDOW = 0.1


def _cuts(history: Any, deaths: dict[int, float]) -> list[Any]:
    """The step's executions whose process died under them: killed mid-step, or so soon after
    the step returned that its result went with the process and the step ran again (`deaths`:
    the poison's own death times by pid)."""
    last = len(history.executions) - 1
    return [
        e
        for i, e in enumerate(history.executions)
        if e.ended is None or (i < last and abs(deaths.get(e.pid, -1e9) - e.ended) <= DEATH_WINDOW)
    ]


def returned_as_poison_killed(histories: dict[str, dict[str, Any]]) -> int:
    """Returned executions of other jobs' steps that ran again because a poison job (tag
    "poison...") killed their process within DEATH_WINDOW of their return: the README's
    at-least-once window (promise 3), not a returned step run again by mistake."""
    deaths = {
        e.pid: e.started
        for tag, steps in histories.items()
        if tag.startswith("poison")
        for e in steps.get("die", _NoRuns).executions
    }
    return sum(
        1
        for tag, steps in histories.items()
        if not tag.startswith("poison")
        for history in steps.values()
        for e in _cuts(history, deaths)
        # A step that raised is retried, not re-run after returning (the ledger counts its
        # next start as after an interruption): counted here, it made the soak's re-runs -1.
        if e.ended is not None and not e.failed
    )


def returned_as_killed(histories: dict[str, dict[str, Any]], killed_at: float) -> int:
    """Returned executions that ran again because their process was SIGKILLed within
    DEATH_WINDOW of their return, at `killed_at` (a row's own kill of a worker): README promise
    3's window between a step's return and its result's commit, as `returned_as_poison_killed`
    for a poison's death. The next execution is in another process (the killed one's is gone)."""
    return sum(
        1
        for steps in histories.values()
        for history in steps.values()
        for e, after in zip(history.executions, history.executions[1:], strict=False)
        if e.ended is not None
        and not e.failed
        and -0.05 <= killed_at - e.ended <= DEATH_WINDOW
        and after.pid != e.pid
    )


def _state(job_id: str) -> str | None:
    """The job's state; None while it cannot be read (a Redis timeout on a loaded machine)."""
    status = status_of(job_id)
    return status.state if status else None


class _NoRuns:
    executions: list[Any] = []


ROWS = [(poison_job, {"n": 200})]

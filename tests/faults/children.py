"""The `make chaos` rows of issue 30: jobs that wait (for children, for events) through faults.

- A parent fans out `n` children (`ctx.children`) while its Dramatiq worker is SIGKILLed and
  Redis is SIGKILLed and restarted from its AOF mid-fan-out: the parent resumes exactly once
  (its step after the fan-in starts once) with every child's result in order; no child is
  lost, none runs on both engines, no returned step runs again.
- Jobs parked in `ctx.wait_for_event` while their Dramatiq worker is dead; the events are sent
  before any worker is back: every job resumes once, with its own event's data.
- Events raced against waits: each job's event sent at a random moment from a second before
  its dispatch to two seconds after it (before the wait began, during, after): none missed
  (a wait that times out returns None), none delivered twice, none to the wrong job.

Every step is a ledger step (tests/faults/jobs.py): each execution counted, duplicates included.
The workers load this module too (JOBYARD_JOB_MODULES)."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel

from jobyard.dispatcher import dispatch_job, send_event
from jobyard.job_engine import JobContext, RetryPolicy, job
from jobyard.job_engine.children import child_job_id
from tests.faults.jobs import ledger_step
from tests.faults.ledger import Ledger
from tests.faults.poison import returned_as_killed
from tests.faults.scenarios import RULE_3, Harness, Row, _timed, say, wait_final
from tests.support import wait_for

JOB_MODULES = "tests.faults.jobs,tests.faults.children"
RETRY = RetryPolicy(attempts=8, backoff=0.2)
#: A racing event's moment, in seconds from its job's dispatch.
RACE_WINDOW = (-1.0, 2.0)
#: How long a racing job waits for its event before it gives up (returns None: a miss).
RACE_TIMEOUT = 120.0


class ChildPayload(BaseModel):
    ledger: str
    tag: str
    work: float = 0.05


@job("faults.fan_child", payload=ChildPayload, retry=RETRY)
async def fan_child(ctx: JobContext, payload: ChildPayload) -> str:
    await ctx.run("s0", ledger_step, payload.ledger, payload.tag, ctx.job_id, "s0", payload.work)
    return payload.tag


class FanPayload(BaseModel):
    ledger: str
    tag: str
    children: int
    work: float = 0.05


@job("faults.fan_parent", payload=FanPayload, retry=RETRY)
async def fan_parent(ctx: JobContext, payload: FanPayload) -> list[str]:
    ledger, tag = payload.ledger, payload.tag
    await ctx.run("before", ledger_step, ledger, tag, ctx.job_id, "before", 0.0)
    calls = [
        ("faults.fan_child", {"ledger": ledger, "tag": child_tag(tag, i), "work": payload.work})
        for i in range(payload.children)
    ]
    results = await ctx.children(calls)
    await ctx.run("after", ledger_step, ledger, tag, ctx.job_id, "after", 0.0)
    return results


def child_tag(parent_tag: str, index: int) -> str:
    return f"{parent_tag}-c{index}"


class EventPayload(BaseModel):
    ledger: str
    tag: str
    timeout: float = RACE_TIMEOUT


@job("faults.wait_event", payload=EventPayload, retry=RETRY)
async def wait_event(ctx: JobContext, payload: EventPayload) -> Any:
    ledger, tag = payload.ledger, payload.tag
    await ctx.run("before", ledger_step, ledger, tag, ctx.job_id, "before", 0.0)
    data = await ctx.wait_for_event(EVENT, match={"tag": tag}, timeout=payload.timeout)
    await ctx.run("after", ledger_step, ledger, tag, ctx.job_id, "after", 0.0)
    return data


EVENT = "faults.ready"


def ended(ledger: Ledger, step: str, prefix: str = "") -> int:
    """Executions of `step` that returned, of tags starting with `prefix`."""
    return sum(
        1
        for tag, steps in ledger.histories().items()
        if tag.startswith(prefix) and step in steps
        for execution in steps[step].executions
        if execution.ended is not None and not execution.failed
    )


def step_starts(ledger: Ledger, tag: str, step: str) -> int:
    steps = ledger.histories().get(tag, {})
    return len(steps[step].executions) if step in steps else 0


def _counted(row: Row, ledger: Ledger, tags: set[str], allowed: int = 0) -> None:
    """`allowed`: returned steps re-run within promise 3's window (see `returned_as_killed`)."""
    counts = ledger.counts(tags)
    row.both_engines, row.rerun_returned = counts.both_engines, counts.rerun_returned - allowed
    row.rerun_interrupted = counts.rerun_interrupted
    row.require(row.lost == 0, "rule 1: nothing accepted is lost")
    row.require(row.both_engines == 0, "rule 2: a job id runs on one engine")
    row.require(row.rerun_returned == 0, RULE_3)


@_timed
def fan_out_through_kills(h: Harness, n: int = 1000, work: float = 0.05) -> Row:
    """`n` children; the Dramatiq worker SIGKILLed once a quarter of them started, Redis
    SIGKILLed (AOF) and restarted once half did."""
    fault = f"fan-out of {n}: worker SIGKILLed, Redis restarted"
    ledger = h.ledger(fault)
    cluster = h.cluster(aof=True, env={"JOBYARD_JOB_MODULES": JOB_MODULES})
    try:
        worker, _ = cluster.start_both()
        payload = {"ledger": str(ledger.path), "tag": "parent", "children": n, "work": work}
        parent = dispatch_job("faults.fan_parent", payload).job_id
        children = {child_tag("parent", i): child_job_id(parent, 1, i, None) for i in range(n)}

        def started(share: float) -> None:
            wait_for(lambda: len(ledger.started_tags()) > n * share, timeout=300, interval=0.2)

        started(0.25)
        killed_at = time.time()
        cluster.sigkill(worker)
        say(f"worker SIGKILLed, {len(ledger.started_tags())} started")
        cluster.start_worker(wait=False)
        started(0.5)
        cluster.redis.sigkill()
        say(f"redis SIGKILLed, {len(ledger.started_tags())} started")
        time.sleep(2.0)
        cluster.redis.start()
        say("redis back")
        final = wait_final({"parent": parent}, h.settle + 300)
        final |= wait_final(children, h.settle)
        row = Row(fault, dispatched=n + 1, accepted=n + 1, completed=len(final))
        row.lost = n + 1 - len(final)
        status = final.get("parent")
        results = status.result if status is not None else None
        row.extra["parent"] = status.state if status is not None else "not final"
        row.extra["resumes"] = step_starts(ledger, "parent", "after")
        row.extra["children_ran"] = ended(ledger, "s0", "parent-c")
        # Steps that returned as the kill landed (promise 3's window) may run again: allowed.
        cut = returned_as_killed(ledger.histories(), killed_at)
        row.extra["returned_as_worker_killed"] = cut
        _counted(row, ledger, {"parent", *children}, allowed=cut)
        row.require(row.extra["parent"] == "succeeded", "the parent succeeds")
        row.require(row.extra["resumes"] == 1, "the parent resumes exactly once")
        row.require(results == list(children), f"the parent has all {n} results, in order")
        return row
    finally:
        cluster.close()


@_timed
def events_while_worker_dead(h: Harness, n: int = 100) -> Row:
    """`n` jobs parked in wait_for_event; their Dramatiq worker SIGKILLed; every event sent
    while no Dramatiq worker is alive; then a worker comes back."""
    fault = "events sent while the waiting jobs' worker is dead"
    ledger = h.ledger(fault)
    cluster = h.cluster(aof=True, env={"JOBYARD_JOB_MODULES": JOB_MODULES})
    try:
        worker, _ = cluster.start_both()
        ids = {
            f"e{i}": dispatch_job(
                "faults.wait_event", {"ledger": str(ledger.path), "tag": f"e{i}"}
            ).job_id
            for i in range(n)
        }
        wait_for(lambda: ended(ledger, "before") >= n, timeout=120, interval=0.2)
        time.sleep(1.5)  # parked: each run ended in its wait
        cluster.sigkill(worker)
        say("worker SIGKILLed with every job parked")
        for tag in ids:
            send_event(EVENT, {"tag": tag, "data": f"for {tag}"})
        say(f"{n} events sent")
        time.sleep(2.0)
        cluster.start_worker(wait=False)
        final = wait_final(ids, h.settle + 60)
        return _event_row(fault, ledger, ids, final)
    finally:
        cluster.close()


@_timed
def events_raced_against_waits(h: Harness, n: int = 500, threads: int = 16) -> Row:
    """Each job's event at a random moment in RACE_WINDOW around its dispatch."""
    fault = f"{n} events raced against their waits"
    ledger = h.ledger(fault)
    cluster = h.cluster(aof=True, env={"JOBYARD_JOB_MODULES": JOB_MODULES})
    ids: dict[str, str] = {}
    lock = threading.Lock()
    chance = random.Random(30)
    offsets = [chance.uniform(*RACE_WINDOW) for _ in range(n)]

    def race(index: int) -> None:
        tag, offset = f"r{index}", offsets[index]
        if offset < 0:  # the event first: the lookback must find it
            send_event(EVENT, {"tag": tag, "data": f"for {tag}"})
            time.sleep(-offset)
        handle = dispatch_job("faults.wait_event", {"ledger": str(ledger.path), "tag": tag})
        with lock:
            ids[tag] = handle.job_id
        if offset >= 0:
            time.sleep(offset)
            send_event(EVENT, {"tag": tag, "data": f"for {tag}"})

    try:
        cluster.start_both()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(race, range(n)))
        say(f"{n} races run ({sum(o < 0 for o in offsets)} events before their dispatch)")
        final = wait_final(ids, h.settle + 60)
        return _event_row(fault, ledger, ids, final)
    finally:
        cluster.close()


def _event_row(fault: str, ledger: Ledger, ids: dict[str, str], final: dict[str, Any]) -> Row:
    row = Row(fault, dispatched=len(ids), accepted=len(ids), completed=len(final))
    row.lost = len(ids) - len(final)
    got = {tag: status.result for tag, status in final.items() if status.state == "succeeded"}
    row.extra["missed"] = sum(1 for data in got.values() if data is None)
    row.extra["wrong_data"] = sum(
        1 for tag, data in got.items() if data is not None and data.get("tag") != tag
    )
    row.extra["resumed_twice"] = sum(1 for tag in ids if step_starts(ledger, tag, "after") > 1)
    row.extra["not_succeeded"] = len(ids) - len(got)
    _counted(row, ledger, set(ids))
    for what in ("missed", "wrong_data", "resumed_twice", "not_succeeded"):
        row.require(row.extra[what] == 0, f"0 {what.replace('_', ' ')}")
    return row


ROWS = [
    (fan_out_through_kills, {"n": 1000}),
    (events_while_worker_dead, {"n": 100}),
    (events_raced_against_waits, {"n": 500}),
]

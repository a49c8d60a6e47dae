"""The `make chaos` row of issue 27: a worker SIGKILLed while its runs hold concurrency slots of
a key. Its leases are not released (the process is gone): they must come back within the
heartbeat timeout (a lease lives WORKER_HEARTBEAT_TIMEOUT unrenewed), the key's limit must never
be exceeded meanwhile, and every job, the killed ones too, must finish.

Every run appends a START and an END line (JSON) to the row's record file; a run killed has no
END, and ends at the kill. Its workers load this module too (JOBYARD_JOB_MODULES)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from jobyard.dispatcher import dispatch_job
from jobyard.job_engine import Concurrency, JobContext, RetryPolicy, job
from tests.faults.jobs import _append
from tests.faults.scenarios import Harness, Row, _timed, say, wait_final
from tests.support import wait_for

LIMIT = 2
JOB_MODULES = "tests.faults.jobs,tests.faults.flow_slots"


class SlotPayload(BaseModel):
    record: str
    tenant: str
    tag: str
    seconds: float = 0.5
    block_once: bool = False  # the first run of this tag holds its slot for a minute


def hold(record: str, tag: str, seconds: float, block_once: bool) -> None:
    _append(record, {"ev": "START", "tag": tag, "t": time.time(), "pid": os.getpid()})
    marker = Path(f"{record}.{tag}.blocked")
    if block_once and not marker.exists():
        marker.touch()
        time.sleep(60)  # holds its slot until its process is killed
    time.sleep(seconds)
    _append(record, {"ev": "END", "tag": tag, "t": time.time(), "pid": os.getpid()})


@job(
    "faults.slot_hold",
    payload=SlotPayload,
    retry=RetryPolicy(attempts=3, backoff=0.2),
    timeout=120,
    concurrency=Concurrency(LIMIT, key="tenant"),
)
async def slot_hold(ctx: JobContext, payload: SlotPayload) -> None:
    await ctx.run("hold", hold, payload.record, payload.tag, payload.seconds, payload.block_once)


def runs(record: str, killed_at: float) -> list[tuple[float, float, str]]:
    """(start, end, tag) of every run; a run without an END ended at the kill."""
    starts: dict[tuple[str, int], float] = {}
    found = []
    for line in Path(record).read_text().splitlines():
        event = json.loads(line)
        key = (event["tag"], event["pid"])
        if event["ev"] == "START":
            starts[key] = event["t"]
        else:
            found.append((starts.pop(key), event["t"], event["tag"]))
    found += [(start, killed_at, tag) for (tag, _), start in starts.items()]
    return found


def most_at_once(found: list[tuple[float, float, str]]) -> int:
    edges = sorted([(s, 1) for s, _, _ in found] + [(e, -1) for _, e, _ in found])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


@_timed
def slots_of_a_killed_worker(h: Harness, n: int = 20, work: float = 0.5) -> Row:
    """Two runs take a key's two slots on worker A; `n` more of the key wait; A is SIGKILLed
    and worker B takes over."""
    record = str(h.workdir / f"flow-slots-{time.monotonic_ns()}.jsonl")
    cluster = h.cluster(aof=True, env={"JOBYARD_JOB_MODULES": JOB_MODULES})
    fault = "a worker SIGKILLed holding concurrency slots"
    try:
        holder = cluster.start_worker(processes=1)
        payload: dict[str, Any] = {"record": record, "tenant": "acme", "seconds": work}
        ids = {
            tag: dispatch_job(
                "faults.slot_hold", {**payload, "tag": tag, "block_once": True}
            ).job_id
            for tag in ("long0", "long1")
        }
        wait_for(lambda: Path(record).exists() and len(runs(record, 0)) == LIMIT, timeout=60)
        for i in range(n):
            ids[f"j{i}"] = dispatch_job("faults.slot_hold", {**payload, "tag": f"j{i}"}).job_id
        cluster.start_worker(processes=1)
        killed_at = time.time()
        holder.signal_group(signal.SIGKILL)
        say("worker holding both slots killed")
        final = wait_final(ids, h.settle + 60)
        found = runs(record, killed_at)
        after = sorted(start for start, _, _ in found if start > killed_at)
        slots_back = after[0] - killed_at if after else float("inf")
        timeout = float(cluster.env["WORKER_HEARTBEAT_TIMEOUT"])
        row = Row(fault, dispatched=len(ids), accepted=len(ids), completed=len(final))
        row.lost = len(ids) - len(final)
        row.extra["slots_back_s"] = round(slots_back, 1)
        row.extra["most_at_once"] = most_at_once(found)
        row.extra["succeeded"] = sum(1 for s in final.values() if s.state == "succeeded")
        say(f"slots back {slots_back:.1f} s after the kill; at most {most_at_once(found)} at once")
        row.require(slots_back <= timeout + 3, f"the slots are back within {timeout:g} s (+3)")
        row.require(row.extra["most_at_once"] <= LIMIT, f"never more than {LIMIT} at once")
        row.require(row.extra["succeeded"] == len(ids), f"all {len(ids)} jobs succeed")
        return row
    finally:
        cluster.close()


ROWS = [(slots_of_a_killed_worker, {"n": 20})]

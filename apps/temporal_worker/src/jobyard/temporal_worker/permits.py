"""The local activity `jobyard.permit`: a Temporal run's passage through its flow-control limits
(docs/flow-control.md), through the engine-neutral Gate and the process's PermitStore
(`jobyard.job_engine.flow.runtime`), the same store and rules the Dramatiq worker uses.

The workflow (workflow.py) asks before its handler runs (`acquire`); refused, it waits in a
timer, woken early by the `jobyard.wake` signal, holding no activity slot and no thread. It
keeps its leases alive while it runs (`renew`) and ends them at its end (`release`), which
signals the waiters due a slot. The activity is stateless: the leases a run holds travel in the
workflow (and its history), so any worker process may renew or release them.

Only limited jobs reach this module; it loads the database driver."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from jobyard.dispatcher.engines.temporal.contract import PERMIT_ACTIVITY
from jobyard.dispatcher.engines.temporal.engine import wake_workflows
from jobyard.job_engine import get_spec
from jobyard.job_engine.errors import InvalidPayloadError
from jobyard.job_engine.flow import runtime
from jobyard.job_engine.flow.limiter import CONCURRENCY
from jobyard.job_engine.flow.metrics import HELD, HELD_RUNS
from jobyard.job_engine.flow.store import Admission, HeldSlot
from jobyard.job_engine.flow.waiting import QUEUE, owner_of

log = logging.getLogger("jobyard.flow")


@activity.defn(name=PERMIT_ACTIVITY)
async def permit(request: dict[str, Any]) -> dict[str, Any]:
    """`op` is `acquire` (job_id, name, payload), `renew` (job_id, held, ttl) or `release`
    (job_id, held)."""
    op = request["op"]
    if op == "acquire":
        return await asyncio.to_thread(_acquire, request)
    held = [HeldSlot(**slot) for slot in request["held"]]
    if op == "renew":
        kept = await asyncio.to_thread(runtime.permit_store().renew_slots, held, request["ttl"])
        lost = [asdict(slot) for slot, ok in zip(held, kept, strict=True) if not ok]
        for slot in lost:
            log.warning("job %s lost its slot in %s/%s", slot["holder"], slot["scope"],
                        slot["bucket"])  # fmt: skip
        return {"lost": lost}
    if op == "release":
        HELD_RUNS.let_go(request["job_id"])
        woken = await asyncio.to_thread(
            runtime.permit_store().release_all, request["job_id"], held,
            runtime.park_seconds() + runtime.lease_ttl(),  # a woken waiter's time to ask
        )  # fmt: skip
        holders = [slot.holder for slot in woken]
        told = await wake_workflows(activity.client(), holders)
        # The others may be Dramatiq jobs parked in Redis (a mixed run): woken there, from a
        # thread of its own (Redis may be down; the release does not wait for it).
        for queue, job_ids in _parked_elsewhere(woken, set(told)).items():
            runtime.wake_elsewhere(queue, job_ids)
        return {"woken": len(told)}
    raise ApplicationError(f"unknown permit op {op!r}", non_retryable=True)


def _acquire(request: dict[str, Any]) -> dict[str, Any]:
    spec = get_spec(request["name"])
    try:
        gate = runtime.gate(spec, request["job_id"], request["payload"])
    except InvalidPayloadError as exc:  # no key field: never run unlimited, fail the job
        raise ApplicationError(str(exc), type=type(exc).__name__, non_retryable=True) from exc
    admission = gate.acquire()
    if admission.granted:
        HELD_RUNS.let_go(request["job_id"])
        return {
            "granted": True,
            "at": admission.at,
            "held": [asdict(slot) for slot in gate.held],
            "ttl": runtime.lease_ttl(),
            "payload": _debounced_payload(admission),
        }
    hold = gate.hold(admission)
    assert hold is not None and admission.refused is not None
    HELD.labels(hold.scope, hold.kind).inc()
    HELD_RUNS.held(request["job_id"], spec.queue, hold.scope, hold.kind, hold.key,
                   admission.retry_in)  # fmt: skip
    refused = admission.refused
    waiting_in = (
        asdict(HeldSlot(refused.scope, refused.bucket, request["job_id"], refused.limit))
        if refused.kind == CONCURRENCY
        else None
    )
    return {
        "granted": False,
        "retry_in": admission.retry_in,
        "display_state": hold.display_state,
        "waiting_reason": hold.waiting_reason,
        "until": hold.until,
        "waiting_in": waiting_in,
    }


def _parked_elsewhere(woken: list[HeldSlot], told: set[str]) -> dict[str, list[str]]:
    """The woken waiters that are no workflow, per queue (a limit's scope names the job or the
    queue whose runs it counts: every waiter of a bucket is of that queue)."""
    found: dict[str, list[str]] = {}
    for slot in woken:
        if slot.holder not in told:
            found.setdefault(queue_of_scope(slot.scope), []).append(slot.holder)
    return found


def queue_of_scope(scope: str) -> str:
    owner_kind, owner = owner_of(scope)
    return owner if owner_kind == QUEUE else get_spec(owner).queue


def _debounced_payload(admission: Admission) -> Any:
    """The claimed burst's last payload, which the run runs with (None: not debounced, or its
    burst is long gone and the dispatch's own payload stands)."""
    claim = admission.debounce
    if claim is None or claim.status != "start":
        return None
    return claim.payload

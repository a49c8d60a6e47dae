"""A limited job's run on Dramatiq (docs/flow-control.md): its passage through the permit
store before its handler runs, its leases kept alive while it runs (and through a durable
sleep), and their release at its end, waking the waiters the release names.

Only jobs with `JobSpec.limited` get here; the runner checks that one attribute."""

from __future__ import annotations

import logging
from typing import Any

from jobyard.job_engine import JobSpec
from jobyard.job_engine.flow import runtime
from jobyard.job_engine.flow.gate import Gate
from jobyard.job_engine.flow.limiter import RATE
from jobyard.job_engine.flow.metrics import HELD
from jobyard.job_engine.flow.waiting import Hold
from jobyard.queue.store import JobStore

log = logging.getLogger("jobyard.flow")

#: The step a debounced run records its burst's payload as, so that a retry replays it.
PAYLOAD_STEP = "__flow__:payload"
#: Seconds a run waits before asking again when the permit store cannot be reached: it never
#: starts without its permits.
STORE_AWAY_SECONDS = 5.0


class Held(BaseException):
    """A limit refused the run: park it for `seconds` (a release may wake it sooner), showing
    `hold`. Raised before the run's Lua start: no attempt is spent."""

    def __init__(self, seconds: float, hold: Hold | None) -> None:
        super().__init__(seconds)
        self.seconds, self.hold = seconds, hold


class RunPermits:
    """One run of a limited job. A resume after a durable sleep is not a new start: it asks
    its concurrency slots (kept through the sleep) and its burst again, not its rate."""

    def __init__(
        self, store: JobStore, spec: JobSpec, job_id: str, payload: Any, resume: bool
    ) -> None:
        self.store, self.queue, self.job_id = store, spec.queue, job_id
        limits = [lim for lim in spec.limits if not (resume and lim.kind == RATE)]
        self.gate = Gate(
            runtime.permit_store(), spec.name, job_id, payload, limits,
            ttl=runtime.lease_ttl(), park=runtime.park_seconds(),
        )  # fmt: skip
        self.granted_at: float | None = None

    def acquire(self) -> Any | None:
        """Every permit, or Held (also while the permit store cannot be reached). The debounced
        burst's last payload when it claimed one."""
        try:
            admission = self.gate.acquire()
        except Exception as exc:  # the database away: wait, never run unlimited
            log.warning("job %s: permit store unavailable (%s); asking again in %gs",
                        self.job_id, exc, STORE_AWAY_SECONDS)  # fmt: skip
            raise Held(STORE_AWAY_SECONDS, None) from exc
        if not admission.granted:
            hold = self.gate.hold(admission)
            if hold is not None:
                HELD.labels(hold.scope, hold.kind).inc()
            raise Held(admission.retry_in, hold)
        self.granted_at = admission.at
        if self.gate.held:
            runtime.renewer(_lost).track(self.job_id, self.gate.held)
        claim = admission.debounce
        return claim.payload if claim is not None and claim.status == "start" else None

    def keep(self, seconds: float) -> None:
        """The run sleeps `seconds` off this process: its leases last until it wakes, and a
        lease time more (nobody renews them meanwhile)."""
        if self.gate.held:
            runtime.renewer().untrack(self.job_id)
            self.gate.store.renew_slots(self.gate.held, seconds + runtime.lease_ttl())

    def forget(self) -> None:
        """Another copy of the job owns its leases (a stale message): leave them be."""
        if self.gate.held:
            runtime.renewer().untrack(self.job_id)

    def release(self) -> None:
        """End the run's leases and wake the waiters due a slot now: in Redis, the parked jobs;
        those Dramatiq does not run are Temporal workflows (a mixed run, a fallback), told by
        `runtime.wake_elsewhere`."""
        if not self.gate.held:
            return
        runtime.renewer().untrack(self.job_id)
        woken = self.gate.release()
        if woken:
            _, elsewhere = self.store.wake_here(self.queue, [slot.holder for slot in woken])
            runtime.wake_elsewhere(self.queue, elsewhere)


def _lost(slot: Any) -> None:
    log.warning("job %s lost its slot in %s/%s: its process stalled past the lease",
                slot.holder, slot.scope, slot.bucket)  # fmt: skip

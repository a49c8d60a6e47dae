"""What both engines call: a run's passage through its declared limits (`Gate`), the renewal of
the leases of a worker process's runs (`LeaseRenewer`), and a debounced dispatch (`collapse`).

    gate = Gate(store, job_limits(spec.name, ...), job_id, payload_data)
    admission = gate.acquire()          # before the handler runs at all
    if not admission.granted:           # park (no attempt spent) for admission.retry_in
        hold = gate.hold(admission)     # its display_state / waiting_reason
    ...
    renewer.track(job_id, gate.held)    # while it runs
    woken = gate.release()              # at its end: wake these waiters early

The keys are read from the payload when the Gate is made: a payload without its key raises
MissingKeyError there (the dispatcher makes the same check earlier, so a job is refused at
dispatch, not in a worker).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from jobyard.job_engine.flow.declarations import Concurrency, Debounce, payload_key
from jobyard.job_engine.flow.limiter import CONCURRENCY, DEBOUNCE, RATE, DebounceTicket
from jobyard.job_engine.flow.limits import DeclaredLimit as DeclaredLimit
from jobyard.job_engine.flow.limits import job_limits as job_limits
from jobyard.job_engine.flow.store import Admission, HeldSlot, PermitRequest, PermitStore
from jobyard.job_engine.flow.waiting import JOB, Hold, describe, scope
from jobyard.job_engine.policy import RateLimit

log = logging.getLogger("jobyard.flow")


def _request(limit: DeclaredLimit, bucket: str, ttl: float, park: float) -> PermitRequest:
    declared = limit.declaration
    if isinstance(declared, RateLimit):
        return PermitRequest(RATE, limit.scope, bucket, calls=declared.calls,
                             period=declared.period)  # fmt: skip
    if isinstance(declared, Concurrency):
        return PermitRequest(CONCURRENCY, limit.scope, bucket, limit=declared.limit, ttl=ttl,
                             park=park)  # fmt: skip
    return PermitRequest(DEBOUNCE, limit.scope, bucket)


class Gate:
    """One run of a job (`job_id`) and the limits it must pass. `ttl`: seconds a lease lives
    without renewal (WORKER_HEARTBEAT_TIMEOUT: a dead worker's slots come back within it);
    `park`: the longest a refused run waits before it asks again unless woken."""

    def __init__(
        self,
        store: PermitStore,
        job_name: str,
        job_id: str,
        payload_data: Any,
        limits: Sequence[DeclaredLimit],
        *,
        ttl: float,
        park: float,
    ) -> None:
        self.store, self.job_name, self.job_id = store, job_name, job_id
        self.claim = park + ttl  # a woken waiter's time to ask (`PermitStore.release_all`)
        self.limits = tuple(limits)
        self.buckets = [payload_key(job_name, payload_data, lim.key_path) for lim in self.limits]
        self.requests = [
            _request(lim, bucket, ttl, park)
            for lim, bucket in zip(self.limits, self.buckets, strict=True)
        ]
        self.held: list[HeldSlot] = []

    def acquire(self) -> Admission:
        """All the run's permits at once, or none (see PermitStore.acquire_all)."""
        admission = self.store.acquire_all(self.job_id, self.requests)
        if admission.granted:
            self.held = [
                HeldSlot(r.scope, r.bucket, self.job_id, r.limit)
                for r in self.requests
                if r.kind == CONCURRENCY
            ]
        return admission

    def admit(self, ttl: float) -> Admission:
        """At dispatch (Dramatiq): take the run's concurrency slots for `ttl` seconds, its time
        in the ready queue, so that no key ever has more than its limit of jobs there; refused,
        the job is dispatched parked, as a waiter. At its start `acquire` renews the same
        leases (a holder's own lease is renewed). Granted when it has no concurrency limit."""
        slots = [replace(r, ttl=ttl) for r in self.requests if r.kind == CONCURRENCY]
        if not slots:
            return Admission(True, 0.0)
        return self.store.acquire_all(self.job_id, slots)

    def hold(self, admission: Admission) -> Hold | None:
        """What the job shows while the refusal holds it (None when it was granted)."""
        if admission.granted or admission.refused is None:
            return None
        refused = admission.refused  # `admit` asks with another ttl: matched by its bucket
        index = next(
            i for i, r in enumerate(self.requests)
            if (r.kind, r.scope, r.bucket) == (refused.kind, refused.scope, refused.bucket)
        )  # fmt: skip
        limit = self.limits[index]
        return Hold(
            limit.kind, limit.scope, describe(limit.declaration), limit.key_path,
            self.buckets[index], until=admission.at + admission.retry_in,
        )  # fmt: skip

    def release(self) -> list[HeldSlot]:
        """End the run's leases; the waiters due a slot now, to wake (best effort: they also
        ask again by themselves). Each must ask within a park time and a lease ttl, or is
        forgotten: the bound a waiter had when every waiter asked once per park time."""
        if not self.held:
            return []
        held, self.held = self.held, []
        return self.store.release_all(self.job_id, held, claim=self.claim)


def collapse(
    store: PermitStore, job_name: str, job_id: str, payload_data: Any, debounce: Debounce
) -> DebounceTicket:
    """A debounced dispatch: joined to the open burst of its key (`joined`: dispatch nothing,
    the job is served by `run_id`), or the run of a new burst, to dispatch with a delay until
    `due` (ms)."""
    bucket = payload_key(job_name, payload_data, debounce.key)
    return store.debounce(
        scope(DEBOUNCE, JOB, job_name), bucket, job_id, payload_data, debounce.period,
        debounce.max_wait,
    )  # fmt: skip


class LeaseRenewer:
    """Renews the leases of a worker process's running jobs every third of `ttl`, in one
    transaction. A run whose lease had expired and been taken meanwhile (its process stalled
    longer than the ttl) is reported to `on_lost` (the engine stops it at its next step)."""

    def __init__(
        self,
        store: PermitStore,
        ttl: float,
        on_lost: Callable[[HeldSlot], None] | None = None,
    ) -> None:
        self.store, self.ttl, self.on_lost = store, ttl, on_lost
        self._runs: dict[str, list[HeldSlot]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, job_id: str, held: Sequence[HeldSlot]) -> None:
        if not held:
            return
        with self._lock:
            self._runs[job_id] = list(held)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._renew_forever, name="jobyard-lease-renewer", daemon=True
                )
                self._thread.start()

    def untrack(self, job_id: str) -> None:
        with self._lock:
            self._runs.pop(job_id, None)

    def renew_now(self) -> list[HeldSlot]:
        """One renewal of every tracked lease; the ones lost."""
        with self._lock:
            held = [slot for slots in self._runs.values() for slot in slots]
        if not held:
            return []
        kept = self.store.renew_slots(held, self.ttl)
        lost = [slot for slot, ok in zip(held, kept, strict=True) if not ok]
        for slot in lost:
            log.warning("run %s lost its slot in %s/%s", slot.holder, slot.scope, slot.bucket)
            if self.on_lost is not None:
                self.on_lost(slot)
        return lost

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew_now()
            except Exception:  # the database is away: try again next beat, leases last a ttl
                log.warning("could not renew leases", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.ttl)

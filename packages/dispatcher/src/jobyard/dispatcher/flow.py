"""Flow control at dispatch (docs/flow-control.md), for jobs that declare a limit (`JobSpec.
limited`; every other job never comes here):

- a debounced job joins its key's open burst (`collapse`): joined, nothing is dispatched and
  the handle names the run that serves it (`served_by`); else it is the burst's run, held
  until the burst is due;
- a concurrency-keyed job bound for Dramatiq takes its slots now, leased for its time in the
  queue (JOBYARD_FLOW_ADMISSION_SECONDS); refused, it is enqueued parked, as a waiter, so that
  no key ever has more than its limit of jobs in the ready list and a small key is never behind
  a big key's backlog. Temporal needs no admission: a waiting workflow holds nothing.

The keys were read from the payload already (`make_submission`: MissingKeyError, a 422).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from jobyard.dispatcher.engines import Submission
from jobyard.dispatcher.models import JobHandle, JobStatus
from jobyard.job_engine import Concurrency, JobSpec, env, registry
from jobyard.job_engine.flow.limiter import CONCURRENCY, DEBOUNCE
from jobyard.job_engine.flow.waiting import COLLAPSED, Hold, describe

if TYPE_CHECKING:
    from jobyard.dispatcher.routing import Router

log = logging.getLogger("jobyard.flow")


class FlowDispatch:
    def __init__(self, router: Router) -> None:
        self.router = router

    def prepare(self, job: Submission, spec: JobSpec) -> Submission | JobHandle:
        """The job as it is to be dispatched (held, if a limit holds it), or the handle of a
        debounced dispatch collapsed into another's run (nothing to dispatch)."""
        # Imported here: the permit store loads the database driver, and only limited jobs
        # need it.
        from jobyard.job_engine.flow import runtime
        from jobyard.job_engine.flow.gate import collapse
        from jobyard.job_engine.flow.metrics import HELD

        store = runtime.permit_store()
        if spec.debounce is not None:
            ticket = collapse(store, spec.name, job.job_id, job.payload, spec.debounce)
            if ticket.joined:
                keep = env.get_float(env.RECORD_RETENTION)
                store.record_collapsed(job.job_id, ticket.run_id, keep)
                return JobHandle(
                    job.job_id, self.router.preferred_engine(), served_by=ticket.run_id
                )
            limit = next(lim for lim in spec.limits if lim.kind == DEBOUNCE)
            hold = Hold(
                DEBOUNCE, limit.scope, describe(spec.debounce), spec.debounce.key,
                _key(spec, job, limit.key_path), until=ticket.due / 1000,
            )  # fmt: skip
            return dataclasses.replace(job, hold=hold)
        if self.router.preferred_engine() != "dramatiq" or job.options.delay:
            return job  # its run asks at its start
        if not any(lim.kind == CONCURRENCY for lim in spec.limits):
            return job
        gate = runtime.gate(spec, job.job_id, job.payload)
        try:
            admission = gate.admit(runtime.admission_seconds())
        except Exception as exc:  # best effort: its run asks at its start all the same
            log.warning("job %s: no admission at dispatch (%s)", job.job_id, exc)
            return job
        if admission.granted:
            return job
        held = gate.hold(admission)
        if held is not None:
            HELD.labels(held.scope, held.kind).inc()
        return dataclasses.replace(job, hold=held)


def _key(spec: JobSpec, job: Submission, path: str | None) -> str:
    from jobyard.job_engine.flow.declarations import payload_key

    return payload_key(spec.name, job.payload, path)


def served_by(job_id: str) -> str | None:
    """The run a collapsed (debounced) dispatch joined, if `job_id` is one; None otherwise
    (and without touching the database when no job is debounced)."""
    if not any(spec.debounce is not None for spec in registry):
        return None
    from jobyard.job_engine.flow import runtime

    try:
        return runtime.permit_store().served_by(job_id)
    except SQLAlchemyError:  # no permit store here: the engines' "not found" stands
        return None


def follow_collapsed(job_id: str, status: JobStatus, run_id: str) -> JobStatus:
    """A collapsed dispatch's status: its run's, shown `collapsed` with `served_by`."""
    return dataclasses.replace(status, job_id=job_id, display_state=COLLAPSED, served_by=run_id)


def install_cross_engine_wake(engine: str) -> None:
    """In a process that runs jobs on `engine` ("dramatiq" or "temporal"): a release there
    that frees a slot for a waiter of the other engine wakes it through this dispatcher
    (`runtime.wake_elsewhere`): a workflow by the `jobyard.wake` signal, a parked Dramatiq job
    in Redis. Without it, such a waiter waited until it asked again by itself."""
    from jobyard.dispatcher.dispatch import get_dispatcher
    from jobyard.job_engine.flow import runtime

    def to_temporal(_queue: str, job_ids: list[str]) -> None:
        wake = getattr(get_dispatcher().temporal, "wake", None)
        if wake is not None:
            wake(job_ids)

    def to_dramatiq(queue: str, job_ids: list[str]) -> None:
        wake = getattr(get_dispatcher().dramatiq, "wake_parked", None)
        if wake is not None:
            wake(queue, job_ids)

    runtime.install_cross_wake(to_temporal if engine == "dramatiq" else to_dramatiq)


#: Waiters a sweep wakes per concurrency limit and pass, at most.
SWEEP_BUDGET = 500


class WaiterSweep:
    """The rescue's flow-control upkeep, each pass: purge the permit store's spent rows, and
    wake the waiters whose slots came back by a lease's expiry (a dead holder: no release
    woke them), round-robin over keys (`PermitStore.due_round_robin`)."""

    def __init__(self, wake: Callable[[str, list[str]], object]) -> None:
        self.wake = wake
        self._after: dict[str, str | None] = {}  # per scope: the last key served

    def run_once(self) -> int:
        """How many waiters it woke; nothing (no database touched) when no job is limited."""
        scopes = _concurrency_scopes()
        if not scopes:
            return 0
        from jobyard.job_engine.flow import runtime

        store = runtime.permit_store()
        store.purge()
        woken = 0
        for scope, (queue, limit) in scopes.items():
            due = store.due_round_robin(scope, limit, SWEEP_BUDGET, self._after.get(scope))
            if due:
                self._after[scope] = due[-1][0]
                self.wake(queue, [holder for _, holder in due])
                woken += len(due)
        return woken


def _concurrency_scopes() -> dict[str, tuple[str, int]]:
    """scope -> (queue, limit) of every concurrency limit a job is under."""
    found: dict[str, tuple[str, int]] = {}
    for spec in registry:
        for lim in spec.limits:
            if lim.kind == CONCURRENCY and isinstance(lim.declaration, Concurrency):
                found[lim.scope] = (spec.queue, lim.declaration.limit)
    return found


def flow_counts(top: int = 20) -> list[dict[str, object]]:
    """The flow-control buckets holding something now, the `top` with most waiting jobs first:
    scope (the limit), key, running, waiting, recent starts. Empty when no job is limited."""
    if not any(spec.limited for spec in registry):
        return []
    from jobyard.job_engine.flow import runtime

    counts = runtime.permit_store().counts()
    counts.sort(key=lambda c: (-c.waiting, -c.running, c.scope, c.bucket))
    return [
        {"scope": c.scope, "key": c.bucket, "running": c.running, "waiting": c.waiting,
         "recent_starts": c.recent_starts}
        for c in counts[:top]
    ]  # fmt: skip

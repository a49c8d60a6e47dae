"""One process's flow-control objects, built lazily by its first limited job: the
`PermitStore` (DATABASE_URL, JOBYARD_FLOW_DURABLE), the `LeaseRenewer` of its running leases,
and a `Gate` per run with the settings every engine uses (a lease lives
WORKER_HEARTBEAT_TIMEOUT; a refused waiter asks again within JOBYARD_FLOW_PARK_SECONDS per
turn it is from a slot, see flow.limiter.PARK_TURNS).

Only limited jobs import this module (it loads the database driver)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jobyard.job_engine import env
from jobyard.job_engine.flow.gate import Gate, LeaseRenewer
from jobyard.job_engine.flow.store import HeldSlot, PermitStore

if TYPE_CHECKING:
    from jobyard.job_engine.registry import JobSpec

log = logging.getLogger("jobyard.flow")

_lock = threading.Lock()
_store: PermitStore | None = None
_renewer: LeaseRenewer | None = None


def lease_ttl() -> float:
    """Seconds a concurrency lease lives unrenewed: a dead worker's slots come back within it."""
    return env.get_float(env.WORKER_HEARTBEAT_TIMEOUT)


def park_seconds() -> float:
    return env.get_float(env.FLOW_PARK_SECONDS)


def admission_seconds() -> float:
    return env.get_float(env.FLOW_ADMISSION_SECONDS)


def permit_store() -> PermitStore:
    """This process's permit store (one pool of connections, made on first use)."""
    global _store
    with _lock:
        if _store is None:
            _store = PermitStore(durable=env.get_bool(env.FLOW_DURABLE))
        return _store


def gate(spec: JobSpec, job_id: str, payload_data: Any) -> Gate:
    """A run of the limited job `spec` at its limits. Raises MissingKeyError for a payload
    without a key field."""
    return Gate(
        permit_store(), spec.name, job_id, payload_data, spec.limits,
        ttl=lease_ttl(), park=park_seconds(),
    )  # fmt: skip


def renewer(on_lost: Callable[[HeldSlot], None] | None = None) -> LeaseRenewer:
    """This process's lease renewer (the first caller's `on_lost` is the one kept)."""
    global _renewer
    store = permit_store()
    with _lock:
        if _renewer is None:
            _renewer = LeaseRenewer(store, lease_ttl(), on_lost)
        return _renewer


def reset() -> None:
    """Forget the store and stop the renewer (after fork; in tests switching databases)."""
    global _store, _renewer
    with _lock:
        if _renewer is not None:
            _renewer.stop()
        _store, _renewer = None, None


#: Wakes, on the other engine, the waiters a release named that this engine could not wake
#: (a Temporal workflow, for a release on Dramatiq; a parked Dramatiq job, for a release on
#: Temporal): `(queue, job ids)`. Installed by the process that can reach that engine
#: (`jobyard.dispatcher.flow.install_cross_engine_wake`); without it those waiters ask again at
#: their own retry_in (at most a lease's ttl for the first ones due a slot) or at the
#: temporal-worker's next sweep.
CrossWake = Callable[[str, list[str]], object]
#: Wakes waiting to be sent, at most: past it a wake is dropped (the waiters ask again anyway).
CROSS_WAKE_BACKLOG = 1000

_cross_wake: CrossWake | None = None
_cross_wakes: queue.Queue[tuple[str, list[str]]] = queue.Queue(CROSS_WAKE_BACKLOG)
_cross_thread: threading.Thread | None = None


def install_cross_wake(wake: CrossWake | None) -> None:
    """Set (None: unset) how this process wakes the other engine's waiters."""
    global _cross_wake
    _cross_wake = wake


def wake_elsewhere(queue_name: str, job_ids: list[str]) -> None:
    """Hand `job_ids` (waiters of `queue_name` a release named, not woken on this engine) to
    the other engine, from a thread of its own: the run's end never waits for that engine, which
    may be slow or down. Best effort, as every wake: a waiter also asks again by itself."""
    global _cross_thread
    if _cross_wake is None or not job_ids:
        return
    try:
        _cross_wakes.put_nowait((queue_name, list(job_ids)))
    except queue.Full:
        return
    with _lock:
        if _cross_thread is None or not _cross_thread.is_alive():
            _cross_thread = threading.Thread(
                target=_send_cross_wakes, name="jobyard-cross-wake", daemon=True
            )
            _cross_thread.start()


def _send_cross_wakes() -> None:
    while True:
        queue_name, job_ids = _cross_wakes.get()
        wake = _cross_wake
        if wake is None:
            continue
        try:
            wake(queue_name, job_ids)
        except Exception as exc:  # the other engine away: its waiters ask again by themselves
            log.debug("could not wake %d waiter(s) on the other engine: %s", len(job_ids), exc)

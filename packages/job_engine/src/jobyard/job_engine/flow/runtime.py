"""One process's flow-control objects, built lazily by its first limited job: the
`PermitStore` (DATABASE_URL, JOBYARD_FLOW_DURABLE), the `LeaseRenewer` of its running leases,
and a `Gate` per run with the settings every engine uses (a lease lives
WORKER_HEARTBEAT_TIMEOUT; a refused waiter asks again within JOBYARD_FLOW_PARK_SECONDS).

Only limited jobs import this module (it loads the database driver)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jobyard.job_engine import env
from jobyard.job_engine.flow.gate import Gate, LeaseRenewer
from jobyard.job_engine.flow.store import HeldSlot, PermitStore

if TYPE_CHECKING:
    from jobyard.job_engine.registry import JobSpec

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

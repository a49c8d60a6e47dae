"""Moves jobs queued on Dramatiq to Temporal when their queue has no live worker left.

Runs inside `jobyard temporal-worker`, the process that is alive when the Dramatiq workers are
not. Each pass: return messages held by dead workers to their queues, move never-started jobs of
worker-less queues to the handoff list in one Lua call, start them on Temporal, and only then
drop them from the handoff list. A crash anywhere repeats a start that Temporal refuses (same
workflow id), never loses a job, and never runs one on both engines.
"""

from __future__ import annotations

import time

from jobyard.dispatcher.engines import Engine
from jobyard.dispatcher.engines.dramatiq import DramatiqEngine
from jobyard.dispatcher.models import FALLBACK_RESCUED
from jobyard.dispatcher.owners import OwnerRegistry
from jobyard.job_engine import env
from jobyard.job_engine.lifecycle import dispatched_event
from jobyard.queue.client import get_client
from jobyard.queue.store import JobStore


class Rescue:
    def __init__(self, dramatiq: DramatiqEngine, temporal: Engine) -> None:
        self.dramatiq = dramatiq
        self.temporal = temporal
        self.owners = OwnerRegistry()

    @classmethod
    def from_env(cls, temporal: Engine) -> Rescue:
        """With the worker-side Redis timeout: a pass may move hundreds of jobs in one call."""
        store = JobStore(get_client(timeout=env.get_float(env.WORKER_REDIS_TIMEOUT)))
        return cls(DramatiqEngine(store, env.get_float(env.WORKER_HEARTBEAT_TIMEOUT)), temporal)

    def run_once(self) -> int:
        """One pass; how many jobs it moved. Raises EngineUnavailable when an engine is down."""
        orphans = self.dramatiq.collect_orphans(FALLBACK_RESCUED)
        for orphan in orphans:
            job = orphan.job
            handed_over = time.time()  # before the start: the job may finish before it returns
            # Redis already records the job as Temporal's; the registry must agree, or a
            # re-dispatch of a caller-chosen id would be sent to Dramatiq and dropped there.
            self.owners.move(job.job_id, "dramatiq", "temporal")
            self.temporal.submit(job)  # a duplicate: an earlier pass crashed before cleaning up
            self.dramatiq.orphan_moved(orphan)
            dispatched_event(
                job.job_id, job.name, job.queue, self.temporal.name, job.payload,
                FALLBACK_RESCUED, handed_over,
            )  # fmt: skip
        return len(orphans)

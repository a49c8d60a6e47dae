"""Moves jobs queued on Dramatiq to Temporal when their queue has no live worker left.

Runs inside `jobyard temporal-worker`, the process that is alive when the Dramatiq workers are
not. Each pass: return messages held by dead workers to their queues, move never-started jobs of
worker-less queues to the handoff list in one Lua call, start them on Temporal, and only then
drop them from the handoff list. A crash anywhere repeats a start that Temporal refuses (same
workflow id), never loses a job, and never runs one on both engines.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.exc import SQLAlchemyError

from jobyard.dispatcher.engines import Engine, Orphan, RescueSource, Submission, SubmitStatus
from jobyard.dispatcher.engines.dramatiq import DramatiqEngine
from jobyard.dispatcher.errors import EngineUnavailable
from jobyard.dispatcher.flow import WaiterSweep
from jobyard.dispatcher.models import FALLBACK_RESCUED, NO_OPTIONS, DispatchOptions, EngineName
from jobyard.dispatcher.owners import OwnerRegistry
from jobyard.dispatcher.upstream import AFTER_RECORD, recorded_after
from jobyard.job_engine import env
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import JobLog, state_in
from jobyard.job_engine.db.steps import load_steps
from jobyard.job_engine.lifecycle import dispatched_event
from jobyard.job_engine.states import UNFINISHED_STATES
from jobyard.queue.client import get_client
from jobyard.queue.store import JobStore

log = logging.getLogger("jobyard.rescue")
#: Seconds a job must be in the job log before its missing Redis record counts as lost.
LOST_GRACE = 10.0
#: Jobs a pass starts on Temporal at once (concurrent starts, one batch's round trip).
MOVE_BATCH = 100
#: A pass due at a heartbeat's expiry runs this much after it (clocks and rounding), and
#: passes are never closer together than MIN_PASS_GAP.
EXPIRY_MARGIN = 0.1
MIN_PASS_GAP = 0.2
#: Seconds to the next pass after one that left jobs on the handoff list.
RETRY_GAP = 0.5


def unfinished_jobs(before: float, limit: int, engine: EngineName = "dramatiq") -> list[Any]:
    """Job log rows of `engine`'s jobs not finished, enqueued before `before` (unix seconds)."""
    with session_scope() as session:
        return list(session.execute(unfinished_query(before, limit, engine)))


def unfinished_query(before: float, limit: int, engine: EngineName = "dramatiq") -> Select[Any]:
    return (
        select(JobLog.job_id, JobLog.name, JobLog.queue, JobLog.payload)
        .where(JobLog.engine == engine, state_in(*UNFINISHED_STATES))
        .where(JobLog.enqueued_at < datetime.fromtimestamp(before, UTC))
        .order_by(JobLog.enqueued_at)
        .limit(limit)
    )


class Rescue:
    """Moves jobs off `source` (the engine whose workers died: Dramatiq's store) onto `target`
    (any engine: Temporal's)."""

    def __init__(self, source: RescueSource, target: Engine) -> None:
        self.source = source
        self.target = target
        self.owners = OwnerRegistry()
        self._retry_soon = False
        self._pass_began = time.monotonic()
        self._waiters: WaiterSweep | None = None

    @classmethod
    def from_env(cls, target: Engine) -> Rescue:
        """Off Dramatiq, with the worker-side Redis timeout: a pass may move hundreds of jobs
        in one call."""
        store = JobStore(get_client(timeout=env.get_float(env.WORKER_REDIS_TIMEOUT)))
        return cls(DramatiqEngine(store, env.get_float(env.WORKER_HEARTBEAT_TIMEOUT)), target)

    def run_once(self) -> int:
        """One pass; how many jobs it moved. Raises EngineUnavailable when Redis is down (a job
        Temporal does not take stays on the handoff list for the next pass)."""
        self._pass_began = time.monotonic()
        orphans = self._with_kept_steps(self.source.collect_orphans(FALLBACK_RESCUED))
        # Redis already records these jobs as Temporal's; the registry must agree, or a
        # re-dispatch of a caller-chosen id would be sent to Dramatiq and dropped there. One
        # statement for the pass: a write per job would queue hundreds of transactions.
        self.owners.move_many([o.job.job_id for o in orphans], self.source.name, self.target.name)
        failed: list[EngineUnavailable] = []
        for at in range(0, len(orphans), MOVE_BATCH):
            failed += self._move(orphans[at : at + MOVE_BATCH])
        if failed:
            log.warning(
                "%d of %d job(s) stay on the handoff list for the next pass: %s",
                len(failed), len(orphans), failed[0],
            )  # fmt: skip
        # Some starts failed while others went through (a slow, busy Temporal): the next pass
        # comes soon, not an interval later. None went through: Temporal is down, no hurry.
        self._retry_soon = 0 < len(failed) < len(orphans)
        moved = len(orphans) - len(failed) + self.recover_lost()
        self.sweep_waiters()
        return moved

    def sweep_waiters(self) -> None:
        """Flow control's upkeep (flow.WaiterSweep): best effort, its database may be away."""
        wake = getattr(self.source, "wake_parked", None)
        if wake is None:
            return
        if self._waiters is None:
            self._waiters = WaiterSweep(wake)
        try:
            self._waiters.run_once()
        except Exception as exc:  # the database or Redis away: the next pass sweeps again
            log.warning("flow-control sweep skipped: %s", exc)

    @staticmethod
    def _with_kept_steps(orphans: list[Orphan]) -> list[Orphan]:
        """Adds the step results the database kept (db/steps.py) to those Redis recorded: a
        worker killed after a step's result was committed there, before Redis recorded it,
        must not have Temporal run that step again."""
        if not orphans:
            return orphans
        try:
            kept = load_steps([o.job.job_id for o in orphans])
        except SQLAlchemyError as exc:  # Redis's records alone, as without a database
            log.debug("kept step results unread: %s", exc)
            return orphans
        out = []
        for orphan in orphans:
            if steps := kept.get(orphan.job.job_id):
                merged = {s: json.loads(r) for s, r in steps.items()}
                merged.update(orphan.job.recorded_steps or {})
                job = dataclasses.replace(orphan.job, recorded_steps=merged)
                orphan = dataclasses.replace(orphan, job=job)
            out.append(orphan)
        return out

    def _move(self, orphans: list[Orphan]) -> list[EngineUnavailable]:
        """Starts the jobs on Temporal at once (a duplicate where an earlier pass stopped
        before cleaning up) and drops the started ones from the handoff list; the errors of
        those that stay on it."""
        handed_over = time.time()  # before the start: a job may finish before it returns
        outcomes = self.target.submit_many([o.job for o in orphans])
        failed = []
        for orphan, outcome in zip(orphans, outcomes, strict=True):
            job = orphan.job
            try:
                if isinstance(outcome, EngineUnavailable):
                    raise outcome
                self.source.orphan_moved(orphan)
            except EngineUnavailable as exc:
                failed.append(exc)
                continue
            dispatched_event(
                job.job_id, job.name, job.queue, self.target.name, job.payload,
                FALLBACK_RESCUED, handed_over,
            )  # fmt: skip
        return failed

    def next_pass_in(self, interval: float) -> float:
        """Seconds until the next pass: `interval`, or sooner if a queue's last live worker's
        heartbeat expires before then, so that its jobs move when its workers are known dead
        rather than up to an interval later. Raises EngineUnavailable when Redis is down."""
        if self._retry_soon:
            return RETRY_GAP
        # Since the last pass began: a heartbeat that expired while the pass ran was not swept.
        expiries = self.source.heartbeat_expiries(time.monotonic() - self._pass_began)
        if not expiries:
            return interval
        return max(MIN_PASS_GAP, min(interval, min(expiries) + EXPIRY_MARGIN))

    def recover_lost(self, grace: float = LOST_GRACE, limit: int = 500) -> int:
        """Dispatches again, under their ids, the unfinished Dramatiq jobs the job log knows
        whose Redis record is gone: Redis restarted empty, or failed over to a replica that
        missed writes. A queue with no live worker sends them on to Temporal."""
        try:
            candidates = unfinished_jobs(time.time() - grace, limit, self.source.name)
        except SQLAlchemyError as exc:  # no job log to recover from: nothing to do
            log.debug("lost job recovery skipped: %s", exc)
            return 0
        lost = set(self.source.missing([row.job_id for row in candidates]))
        if not lost:
            return 0
        # The steps that had returned, kept in the database as they returned (db/steps.py):
        # Redis lost them with the job, and they must not run again.
        try:
            recorded = load_steps(sorted(lost))
        except SQLAlchemyError as exc:
            log.warning("lost jobs wait: their step results cannot be read (%s)", exc)
            return 0
        for row in candidates:
            if row.job_id not in lost or row.payload is None or row.queue is None:
                continue
            steps = dict(recorded.get(row.job_id, {}))
            after = recorded_after(row.job_id, steps)  # still waits for its upstream jobs
            steps.pop(AFTER_RECORD, None)
            options = DispatchOptions(after=after) if after else NO_OPTIONS
            job = Submission(row.job_id, row.name, row.queue, row.payload, options)
            log.warning(
                "job %s is in the job log but not in Redis: dispatched again (%d step(s) kept)",
                job.job_id, len(steps),
            )  # fmt: skip
            if steps:
                self.source.restore_steps(job.job_id, steps)
            if self.source.recover(job).status == SubmitStatus.NO_WORKERS:
                self.owners.move(job.job_id, self.source.name, self.target.name)
                decoded = {step: json.loads(result) for step, result in steps.items()}
                moved = dataclasses.replace(
                    job, fallback_reason=FALLBACK_RESCUED, recorded_steps=decoded or None
                )
                self.target.submit(moved)
        return len(lost)

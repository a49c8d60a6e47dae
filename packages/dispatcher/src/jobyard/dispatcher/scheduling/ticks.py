"""One claimed tick, from its lease to its dispatch: the lease taken, renewed before the
dispatch (the fence), the overlap policy applied, and the tick marked fired, skipped, buffered
or failed. Every change is conditional on the row still being ours."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select, update

from jobyard.dispatcher.errors import DispatchUnavailableError
from jobyard.dispatcher.scheduling.rows import ACTIVE_JOB_STATES, OPEN_TICK_STATES, rowcount
from jobyard.job_engine import JobyardError
from jobyard.job_engine.db import session_scope, utcnow
from jobyard.job_engine.db.models import ScheduleState, ScheduleTick
from jobyard.job_engine.metrics import SCHEDULE_FIRES
from jobyard.job_engine.schedules import Schedule

if TYPE_CHECKING:
    from jobyard.dispatcher.scheduling.passes import Scheduler

log = logging.getLogger("jobyard.scheduler")


def process(scheduler: Scheduler, row: ScheduleTick, spec: Schedule | None, now: datetime) -> str:
    """Dispatch one claimed tick (or skip or buffer it); returns what became of it."""
    taken_over = row.owner not in (None, scheduler.owner) and row.state == "pending"
    if not _take(scheduler, row, now):
        return "taken"
    if spec is None:
        _set(scheduler, row, state="failed", error="schedule no longer declared", owner=None)
        return "failed"
    if taken_over:
        # Its claimant died after claiming; it may have dispatched before dying.
        found = scheduler.status(row.job_id)
        if found is not None:
            _fired(scheduler, row, spec, found.engine, now)
            return "fired"
    if row.kind == "tick" and spec.overlap != "allow_all":
        verdict = _overlap(scheduler, row, spec)
        if verdict is not None:
            return verdict
    if not _renew(scheduler, row):
        return "taken"
    try:
        handle = scheduler.dispatch(spec.job, spec.payload, row.job_id)
    except DispatchUnavailableError as exc:
        log.warning("schedule %s: tick %s not dispatched yet: %s", spec.name, row.job_id, exc)
        return "retry"  # still ours and pending: the next pass tries again
    except (JobyardError, ValueError) as exc:
        log.error("schedule %s: tick %s cannot be dispatched: %s", spec.name, row.job_id, exc)
        if _set(
            scheduler, row, state="failed", error=str(exc)[:2000], owner=None, lease_until=None
        ):
            SCHEDULE_FIRES.labels(spec.name, "failed").inc()
        return "failed"
    _fired(scheduler, row, spec, handle.engine, now)
    return "fired"


def _take(scheduler: Scheduler, row: ScheduleTick, now: datetime) -> bool:
    """Hold the row's lease: ours already, or free, or its holder's ran out."""
    if row.owner == scheduler.owner:
        return True
    with session_scope(scheduler.url) as session:
        taken = rowcount(
            session.execute(
                update(ScheduleTick)
                .where(
                    ScheduleTick.job_id == row.job_id,
                    ScheduleTick.state == row.state,
                    or_(ScheduleTick.owner.is_(None), ScheduleTick.lease_until < now),
                )
                .values(owner=scheduler.owner, lease_until=now + scheduler.lease)
            )
        )
    return taken == 1


def _renew(scheduler: Scheduler, row: ScheduleTick) -> bool:
    """Fence before dispatching: our lease runs a full term from now, or we lost the row.

    A dispatch takes seconds at most (its Redis and Temporal timeouts), far less than the
    lease, so no other scheduler can take the tick over while we dispatch it: the tick is
    dispatched by one scheduler only, not merely deduplicated by the engines afterwards.
    """
    return _set(scheduler, row, lease_until=utcnow() + scheduler.lease)


def _set(scheduler: Scheduler, row: ScheduleTick, **values: Any) -> bool:
    """Move our row on; False when it is no longer ours (another scheduler took it)."""
    with session_scope(scheduler.url) as session:
        return (
            rowcount(
                session.execute(
                    update(ScheduleTick)
                    .where(
                        ScheduleTick.job_id == row.job_id,
                        ScheduleTick.owner == scheduler.owner,
                        ScheduleTick.state.in_(OPEN_TICK_STATES),
                    )
                    .values(**values)
                )
            )
            == 1
        )


def _overlap(scheduler: Scheduler, row: ScheduleTick, spec: Schedule) -> str | None:
    """None when the tick may run now; else what was done with it (skipped, buffered)."""
    with session_scope(scheduler.url) as session:
        previous = session.scalars(
            select(ScheduleTick.job_id)
            .where(
                ScheduleTick.schedule == row.schedule,
                ScheduleTick.state == "dispatched",
                ScheduleTick.tick_at < row.tick_at,
            )
            .order_by(ScheduleTick.tick_at.desc())
            .limit(1)
        ).first()
        buffered = session.scalars(
            select(ScheduleTick.job_id).where(
                ScheduleTick.schedule == row.schedule,
                ScheduleTick.state == "buffered",
                ScheduleTick.job_id != row.job_id,
            )
        ).first()
    if previous is None or not _running(scheduler, previous):
        return None
    if spec.overlap == "buffer_one" and (row.state == "buffered" or buffered is None):
        _set(scheduler, row, state="buffered", owner=None, lease_until=None)
        return "buffered"
    if _set(scheduler, row, state="skipped", error=f"{previous} still running", owner=None):
        with session_scope(scheduler.url) as session:
            session.execute(
                update(ScheduleState)
                .where(ScheduleState.name == row.schedule)
                .values(skipped_overlap=ScheduleState.skipped_overlap + 1)
            )
        SCHEDULE_FIRES.labels(spec.name, "skipped_overlap").inc()
        log.info("schedule %s: %s skipped: %s still running", spec.name, row.job_id, previous)
    return "skipped"


def _running(scheduler: Scheduler, job_id: str) -> bool:
    try:
        found = scheduler.status(job_id)
    except Exception as exc:  # an engine we cannot ask must not stop the schedule
        log.warning("scheduler: state of %s unknown (%s); not counted as running", job_id, exc)
        return False
    return found is not None and found.state in ACTIVE_JOB_STATES


def _fired(
    scheduler: Scheduler, row: ScheduleTick, spec: Schedule, engine: str, now: datetime
) -> None:
    if not _set(
        scheduler,
        row,
        state="dispatched",
        engine=engine,
        dispatched_at=now,
        owner=None,
        lease_until=None,
    ):
        return
    with session_scope(scheduler.url) as session:
        session.execute(
            update(ScheduleState)
            .where(ScheduleState.name == row.schedule)
            .values(fired=ScheduleState.fired + 1, last_fired_at=now)
        )
        session.execute(
            update(ScheduleState)
            .where(
                ScheduleState.name == row.schedule,
                or_(
                    ScheduleState.last_tick_at.is_(None),
                    ScheduleState.last_tick_at <= row.tick_at,
                ),
            )
            .values(last_tick_at=row.tick_at, last_job_id=row.job_id)
        )
    SCHEDULE_FIRES.labels(spec.name, "fired").inc()

"""Claiming ticks: a schedule's due ticks become rows of schedule_ticks owned by this scheduler,
with the cursor moved by compare-and-set in the same transaction (`advance`); a trigger's or a
backfill's ticks are claimed the same way, without the cursor (`claim`)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from jobyard.dispatcher.scheduling.rows import BATCH, MICROSECOND, rowcount
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import ScheduleState, ScheduleTick
from jobyard.job_engine.metrics import SCHEDULE_FIRES
from jobyard.job_engine.schedules import Schedule, manual_job_id, tick_job_id

if TYPE_CHECKING:
    from jobyard.dispatcher.scheduling.passes import Scheduler

log = logging.getLogger("jobyard.scheduler")


def advance(
    scheduler: Scheduler, spec: Schedule, state: ScheduleState | None, now: datetime
) -> None:
    """Claim the ticks due since the cursor, skip those outside the catch-up window."""
    if state is None:
        # First sight of a schedule: it starts now; a new deployment does not fire the past.
        try:
            with session_scope(scheduler.url) as session:
                session.add(ScheduleState(name=spec.name, cursor=now, updated_at=now))
        except IntegrityError:
            pass  # another scheduler created it first
        return
    if state.paused:
        return
    window = max(spec.catchup_window or timedelta(0), scheduler.grace)
    horizon = now - window  # ticks at or after it are on time (or inside the window)
    old_count, old_last = spec.span(state.cursor, horizon - MICROSECOND)
    fire = spec.fire_times(max(state.cursor, horizon - MICROSECOND), now, limit=BATCH)
    if spec.catchup_window is None and not fire and old_last is not None:
        fire, old_count = [old_last], old_count - 1  # no window: the latest missed tick
    if not fire and not old_count:
        return
    cursor = fire[-1] if fire else old_last
    ids = {tick_job_id(spec.name, tick): tick for tick in fire}
    with session_scope(scheduler.url) as session:
        moved = rowcount(
            session.execute(
                update(ScheduleState)
                .where(
                    ScheduleState.name == spec.name,
                    ScheduleState.cursor == state.cursor,
                    ScheduleState.paused.is_(False),
                )
                .values(
                    cursor=cursor,
                    skipped_catchup=ScheduleState.skipped_catchup + old_count,
                    updated_at=now,
                )
            )
        )
        if moved != 1:  # another scheduler claimed these ticks first
            session.rollback()
            return
        # A backfill may already hold some of these ticks: they ran (or run) once already.
        taken = set(
            session.scalars(select(ScheduleTick.job_id).where(ScheduleTick.job_id.in_(ids)))
        )
        for job_id, tick in ids.items():
            if job_id not in taken:
                session.add(
                    ScheduleTick(
                        job_id=job_id,
                        schedule=spec.name,
                        kind="tick",
                        tick_at=tick,
                        state="pending",
                        owner=scheduler.owner,
                        lease_until=now + scheduler.lease,
                        claimed_at=now,
                    )
                )
    if old_count:
        SCHEDULE_FIRES.labels(spec.name, "skipped_catchup").inc(old_count)
        log.warning(
            "schedule %s: %d missed tick(s) older than its catch-up window skipped",
            spec.name,
            old_count,
        )


def claim(
    scheduler: Scheduler, spec: Schedule, kind: str, ticks: list[datetime], now: datetime
) -> list[ScheduleTick]:
    """Insert tick rows owned by us; returns the rows inserted (ticks already claimed are
    left alone: each tick runs once, a backfill included)."""
    ids = {
        (manual_job_id(spec.name, t) if kind == "trigger" else tick_job_id(spec.name, t)): t
        for t in ticks
    }
    with session_scope(scheduler.url) as session:
        taken = set(
            session.scalars(select(ScheduleTick.job_id).where(ScheduleTick.job_id.in_(ids)))
        )
        rows = [
            ScheduleTick(
                job_id=job_id,
                schedule=spec.name,
                kind=kind,
                tick_at=tick,
                state="pending",
                owner=scheduler.owner,
                lease_until=now + scheduler.lease,
                claimed_at=now,
            )
            for job_id, tick in ids.items()
            if job_id not in taken
        ]
        session.add_all(rows)
    return rows

"""Housekeeping after a pass: each tick's lag (tick time to job start, from the job log) and
the pruning of old tick rows."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update

from jobyard.dispatcher.scheduling.rows import OPEN_TICK_STATES, rowcount
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import JobLog, ScheduleTick
from jobyard.job_engine.metrics import SCHEDULE_TICK_LAG

if TYPE_CHECKING:
    from jobyard.dispatcher.scheduling.passes import Scheduler

#: How long after its dispatch a tick's job start is looked up in the job log (for the lag).
LAG_LOOKBACK = timedelta(hours=1)
PRUNE_EVERY = timedelta(hours=1)


def record_lags(scheduler: Scheduler, now: datetime) -> None:
    """Tick time -> job start, once per tick, from the job log (whichever engine ran it)."""
    with session_scope(scheduler.url) as session:
        found = session.execute(
            select(ScheduleTick.job_id, ScheduleTick.schedule, ScheduleTick.tick_at,
                   JobLog.started_at)
            .join(JobLog, JobLog.job_id == ScheduleTick.job_id)
            .where(
                ScheduleTick.state == "dispatched",
                ScheduleTick.kind == "tick",
                ScheduleTick.started_at.is_(None),
                ScheduleTick.dispatched_at > now - LAG_LOOKBACK,
                JobLog.started_at.is_not(None),
            )
        ).all()  # fmt: skip
    for job_id, name, tick_at, started_at in found:
        with session_scope(scheduler.url) as session:
            won = rowcount(
                session.execute(
                    update(ScheduleTick)
                    .where(ScheduleTick.job_id == job_id, ScheduleTick.started_at.is_(None))
                    .values(started_at=started_at)
                )
            )
        if won == 1:
            assert started_at is not None  # the query keeps started jobs only
            lag = (started_at - tick_at).total_seconds()
            SCHEDULE_TICK_LAG.labels(name).observe(max(0.0, lag))


def prune(scheduler: Scheduler, now: datetime) -> None:
    if scheduler.last_prune is not None and now - scheduler.last_prune < PRUNE_EVERY:
        return
    scheduler.last_prune = now
    with session_scope(scheduler.url) as session:
        session.execute(
            delete(ScheduleTick).where(
                ScheduleTick.tick_at < now - scheduler.retention,
                ScheduleTick.state.not_in(OPEN_TICK_STATES),
            )
        )

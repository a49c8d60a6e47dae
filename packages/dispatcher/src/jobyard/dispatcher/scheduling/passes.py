"""The Scheduler: one scheduler's settings and its pass over every schedule (claim what is due,
work through the open tick rows, then housekeeping). The design is in
`jobyard.dispatcher.scheduler`'s docstring."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.exc import SQLAlchemyError

from jobyard.dispatcher.scheduling import claims, housekeeping
from jobyard.dispatcher.scheduling.engines import Dispatch, Status, dispatch_with_id, job_status
from jobyard.dispatcher.scheduling.rows import BATCH, OPEN_TICK_STATES
from jobyard.dispatcher.scheduling.ticks import process as process_tick
from jobyard.job_engine import env
from jobyard.job_engine.db import session_scope, utcnow
from jobyard.job_engine.db.models import ScheduleState, ScheduleTick
from jobyard.job_engine.schedules import Schedule, ScheduleError, schedule_registry, with_env

log = logging.getLogger("jobyard.scheduler")


def _owner_id(role: str) -> str:
    return f"{role}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Scheduler:
    """One scheduler; `run_once()` is one pass. Safe to run in any number of processes."""

    def __init__(
        self,
        *,
        url: str | None = None,
        dispatch: Dispatch = dispatch_with_id,
        status: Status = job_status,
        role: str = "scheduler",
    ) -> None:
        self.url = url
        self.dispatch = dispatch
        self.status = status
        self.owner = _owner_id(role)
        self.poll = env.get_float(env.SCHEDULER_POLL)
        self.lease = timedelta(seconds=env.get_float(env.SCHEDULER_LEASE))
        self.grace = timedelta(seconds=env.get_float(env.SCHEDULER_GRACE))
        self.retention = timedelta(days=env.get_float(env.SCHEDULER_RETENTION))
        longest_dispatch = env.get_float(env.REDIS_TIMEOUT) + env.get_float(
            env.TEMPORAL_START_TIMEOUT
        )
        if self.lease.total_seconds() < 2 * longest_dispatch:
            log.warning(
                "%s=%s is short: a dispatch may take %.1fs; another scheduler could take a tick "
                "over mid-dispatch (the engines would still start it once)",
                env.SCHEDULER_LEASE,
                self.lease.total_seconds(),
                longest_dispatch,
            )
        self._bad_overrides: set[str] = set()
        self.last_prune: datetime | None = None  # housekeeping.prune's

    # --- the schedules as configured now ---------------------------------------------------

    def schedules(self) -> dict[str, Schedule]:
        """Declared schedules with their env overrides; a bad override is logged, not fatal."""
        found: dict[str, Schedule] = {}
        for declared in schedule_registry.declared():
            try:
                found[declared.name] = with_env(declared)
            except ScheduleError as exc:
                if declared.name not in self._bad_overrides:
                    self._bad_overrides.add(declared.name)
                    log.error("schedule %s not scheduled: %s", declared.name, exc)
        return found

    # --- one pass ----------------------------------------------------------------------------

    def run_once(self, now: datetime | None = None) -> float:
        """Claim and fire what is due; returns the seconds to wait before the next pass."""
        now = now or utcnow()
        specs = self.schedules()
        with session_scope(self.url) as session:
            states = {s.name: s for s in session.scalars(select(ScheduleState))}
        for spec in specs.values():
            if spec.enabled:
                self._guard(spec.name, claims.advance, self, spec, states.get(spec.name), now)
        self._work(specs, now)
        self._guard("lags", housekeeping.record_lags, self, now)
        self._guard("prune", housekeeping.prune, self, now)
        upcoming = [
            spec.next_fire(now)
            for spec in specs.values()
            if spec.enabled and not (spec.name in states and states[spec.name].paused)
        ]
        wait = self.poll
        if upcoming:
            wait = min(wait, (min(upcoming) - utcnow()).total_seconds())
        return max(0.0, wait)

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """One schedule's trouble must not stop the others; a database outage stops the pass."""
        try:
            fn(*args)
        except SQLAlchemyError:
            raise
        except Exception:
            log.exception("scheduler: %s failed", what)

    def _work(self, specs: dict[str, Schedule], now: datetime) -> None:
        """Dispatch this scheduler's claimed ticks, buffered ticks, and ticks whose claimant
        died (lease over)."""
        with session_scope(self.url) as session:
            rows = list(
                session.scalars(
                    select(ScheduleTick)
                    .where(
                        ScheduleTick.state.in_(OPEN_TICK_STATES),
                        or_(
                            ScheduleTick.owner == self.owner,
                            ScheduleTick.owner.is_(None),
                            ScheduleTick.lease_until < now,
                        ),
                    )
                    .order_by(ScheduleTick.tick_at)
                    .limit(BATCH)
                )
            )
        for row in rows:
            self._guard(row.job_id, self.process, row, specs.get(row.schedule), now)

    # --- one tick, and claims outside the timetable (trigger, backfill) ------------------------

    def process(self, row: ScheduleTick, spec: Schedule | None, now: datetime) -> str:
        """Dispatch one claimed tick (or skip or buffer it); returns what became of it."""
        return process_tick(self, row, spec, now)

    def claim(
        self, spec: Schedule, kind: str, ticks: list[datetime], now: datetime
    ) -> list[ScheduleTick]:
        """Insert tick rows owned by us; returns the rows inserted (ticks already claimed are
        left alone: each tick runs once, a backfill included)."""
        return claims.claim(self, spec, kind, ticks, now)

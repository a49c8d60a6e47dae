"""The scheduler: fires declared schedules (`jobyard.job_engine.schedule`) exactly once per tick.

Every `jobyard worker` and `jobyard temporal-worker` runs one in a thread (`JOBYARD_SCHEDULER=false`
turns it off), and `jobyard scheduler` runs one alone. They need no leader: they coordinate
through two tables of the SQL database jobyard already has, not through Redis, so schedules keep
firing while Redis is down (their jobs then go to Temporal).

* `schedule_state.cursor`: every tick up to the cursor has been claimed or skipped. A pass reads
  the ticks due after it and moves it with a compare-and-set (`UPDATE ... WHERE cursor = old`),
  in the same transaction that inserts those ticks into `schedule_ticks`. Two schedulers that
  race: one update matches, the other's matches nothing and it rolls back.
* `schedule_ticks`: one row per claimed tick, keyed by the tick's job id, which is derived from
  the schedule's name and the tick time. The claimant dispatches it with that job id and marks
  it dispatched. If it dies in between, the row's lease (`JOBYARD_SCHEDULER_LEASE`) runs out
  and another scheduler takes it over: it asks the engines whether the job id exists and
  dispatches only if not (the dispatcher's idempotency covers the rest).

So a tick starts one job, however many schedulers run, and a scheduler killed mid-tick delays
that tick by at most the lease. Skipped ticks (overlap, catch-up) are counted in the state row
and in `jobyard_schedule_fires_total`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, Result, delete, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from jobyard.dispatcher.errors import DispatchUnavailableError
from jobyard.job_engine import JobyardError, env
from jobyard.job_engine.db import session_scope, utcnow
from jobyard.job_engine.db.models import JobLog, ScheduleState, ScheduleTick
from jobyard.job_engine.metrics import SCHEDULE_FIRES, SCHEDULE_TICK_LAG
from jobyard.job_engine.schedules import (
    Schedule,
    ScheduleError,
    manual_job_id,
    schedule_registry,
    tick_job_id,
    with_env,
)

log = logging.getLogger("jobyard.scheduler")

ACTIVE_JOB_STATES = ("queued", "running", "retrying")
OPEN_TICK_STATES = ("pending", "buffered")
#: Ticks one schedule claims in one pass; a longer catch-up continues in the next pass.
BATCH = 500
#: Most ticks one backfill may ask for.
MAX_BACKFILL = 1000
#: How long after its dispatch a tick's job start is looked up in the job log (for the lag).
LAG_LOOKBACK = timedelta(hours=1)
PRUNE_EVERY = timedelta(hours=1)
_US = timedelta(microseconds=1)

Dispatch = Callable[[str, dict[str, Any], str], Any]  # (job, payload, job_id) -> JobHandle
Status = Callable[[str], Any]  # job_id -> JobStatus or None (not found)


def _dispatch(name: str, payload: dict[str, Any], job_id: str) -> Any:
    from jobyard.dispatcher.dispatch import dispatch_job

    return dispatch_job(name, payload, job_id=job_id)


def _status(job_id: str) -> Any:
    from jobyard.dispatcher.dispatch import get_job
    from jobyard.dispatcher.errors import JobNotFoundError

    try:
        return get_job(job_id)
    except JobNotFoundError:
        return None


def _owner_id(role: str) -> str:
    return f"{role}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Scheduler:
    """One scheduler; `run_once()` is one pass. Safe to run in any number of processes."""

    def __init__(
        self,
        *,
        url: str | None = None,
        dispatch: Dispatch = _dispatch,
        status: Status = _status,
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
        self._last_prune: datetime | None = None

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
                self._guard(spec.name, self._advance, spec, states.get(spec.name), now)
        self._work(specs, now)
        self._guard("lags", self._record_lags, now)
        self._guard("prune", self._prune, now)
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

    def _advance(self, spec: Schedule, state: ScheduleState | None, now: datetime) -> None:
        """Claim the ticks due since the cursor, skip those outside the catch-up window."""
        if state is None:
            # First sight of a schedule: it starts now; a new deployment does not fire the past.
            try:
                with session_scope(self.url) as session:
                    session.add(ScheduleState(name=spec.name, cursor=now, updated_at=now))
            except IntegrityError:
                pass  # another scheduler created it first
            return
        if state.paused:
            return
        window = max(spec.catchup_window or timedelta(0), self.grace)
        horizon = now - window  # ticks at or after it are on time (or inside the window)
        old_count, old_last = spec.span(state.cursor, horizon - _US)
        fire = spec.fire_times(max(state.cursor, horizon - _US), now, limit=BATCH)
        if spec.catchup_window is None and not fire and old_last is not None:
            fire, old_count = [old_last], old_count - 1  # no window: the latest missed tick
        if not fire and not old_count:
            return
        cursor = fire[-1] if fire else old_last
        ids = {tick_job_id(spec.name, tick): tick for tick in fire}
        with session_scope(self.url) as session:
            moved = _rowcount(
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
                            owner=self.owner,
                            lease_until=now + self.lease,
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

    # --- one tick ------------------------------------------------------------------------------

    def _take(self, row: ScheduleTick, now: datetime) -> bool:
        """Hold the row's lease: ours already, or free, or its holder's ran out."""
        if row.owner == self.owner:
            return True
        with session_scope(self.url) as session:
            taken = _rowcount(
                session.execute(
                    update(ScheduleTick)
                    .where(
                        ScheduleTick.job_id == row.job_id,
                        ScheduleTick.state == row.state,
                        or_(ScheduleTick.owner.is_(None), ScheduleTick.lease_until < now),
                    )
                    .values(owner=self.owner, lease_until=now + self.lease)
                )
            )
        return taken == 1

    def _renew(self, row: ScheduleTick) -> bool:
        """Fence before dispatching: our lease runs a full term from now, or we lost the row.

        A dispatch takes seconds at most (its Redis and Temporal timeouts), far less than the
        lease, so no other scheduler can take the tick over while we dispatch it: the tick is
        dispatched by one scheduler only, not merely deduplicated by the engines afterwards.
        """
        return self._set(row, lease_until=utcnow() + self.lease)

    def _set(self, row: ScheduleTick, **values: Any) -> bool:
        """Move our row on; False when it is no longer ours (another scheduler took it)."""
        with session_scope(self.url) as session:
            return (
                _rowcount(
                    session.execute(
                        update(ScheduleTick)
                        .where(
                            ScheduleTick.job_id == row.job_id,
                            ScheduleTick.owner == self.owner,
                            ScheduleTick.state.in_(OPEN_TICK_STATES),
                        )
                        .values(**values)
                    )
                )
                == 1
            )

    def process(self, row: ScheduleTick, spec: Schedule | None, now: datetime) -> str:
        """Dispatch one claimed tick (or skip or buffer it); returns what became of it."""
        taken_over = row.owner not in (None, self.owner) and row.state == "pending"
        if not self._take(row, now):
            return "taken"
        if spec is None:
            self._set(row, state="failed", error="schedule no longer declared", owner=None)
            return "failed"
        if taken_over:
            # Its claimant died after claiming; it may have dispatched before dying.
            found = self.status(row.job_id)
            if found is not None:
                self._fired(row, spec, found.engine, now)
                return "fired"
        if row.kind == "tick" and spec.overlap != "allow_all":
            verdict = self._overlap(row, spec)
            if verdict is not None:
                return verdict
        if not self._renew(row):
            return "taken"
        try:
            handle = self.dispatch(spec.job, spec.payload, row.job_id)
        except DispatchUnavailableError as exc:
            log.warning("schedule %s: tick %s not dispatched yet: %s", spec.name, row.job_id, exc)
            return "retry"  # still ours and pending: the next pass tries again
        except (JobyardError, ValueError) as exc:
            log.error("schedule %s: tick %s cannot be dispatched: %s", spec.name, row.job_id, exc)
            if self._set(row, state="failed", error=str(exc)[:2000], owner=None, lease_until=None):
                SCHEDULE_FIRES.labels(spec.name, "failed").inc()
            return "failed"
        self._fired(row, spec, handle.engine, now)
        return "fired"

    def _overlap(self, row: ScheduleTick, spec: Schedule) -> str | None:
        """None when the tick may run now; else what was done with it (skipped, buffered)."""
        with session_scope(self.url) as session:
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
        if previous is None or not self._running(previous):
            return None
        if spec.overlap == "buffer_one" and (row.state == "buffered" or buffered is None):
            self._set(row, state="buffered", owner=None, lease_until=None)
            return "buffered"
        if self._set(row, state="skipped", error=f"{previous} still running", owner=None):
            with session_scope(self.url) as session:
                session.execute(
                    update(ScheduleState)
                    .where(ScheduleState.name == row.schedule)
                    .values(skipped_overlap=ScheduleState.skipped_overlap + 1)
                )
            SCHEDULE_FIRES.labels(spec.name, "skipped_overlap").inc()
            log.info("schedule %s: %s skipped: %s still running", spec.name, row.job_id, previous)
        return "skipped"

    def _running(self, job_id: str) -> bool:
        try:
            found = self.status(job_id)
        except Exception as exc:  # an engine we cannot ask must not stop the schedule
            log.warning("scheduler: state of %s unknown (%s); not counted as running", job_id, exc)
            return False
        return found is not None and found.state in ACTIVE_JOB_STATES

    def _fired(self, row: ScheduleTick, spec: Schedule, engine: str, now: datetime) -> None:
        if not self._set(
            row, state="dispatched", engine=engine, dispatched_at=now, owner=None, lease_until=None
        ):
            return
        with session_scope(self.url) as session:
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

    # --- housekeeping --------------------------------------------------------------------------

    def _record_lags(self, now: datetime) -> None:
        """Tick time -> job start, once per tick, from the job log (whichever engine ran it)."""
        with session_scope(self.url) as session:
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
            with session_scope(self.url) as session:
                won = _rowcount(
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

    def _prune(self, now: datetime) -> None:
        if self._last_prune is not None and now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        with session_scope(self.url) as session:
            session.execute(
                delete(ScheduleTick).where(
                    ScheduleTick.tick_at < now - self.retention,
                    ScheduleTick.state.not_in(OPEN_TICK_STATES),
                )
            )

    # --- operations (CLI, admin API) -----------------------------------------------------------

    def claim(
        self, spec: Schedule, kind: str, ticks: list[datetime], now: datetime
    ) -> list[ScheduleTick]:
        """Insert tick rows owned by us; returns the rows inserted (ticks already claimed are
        left alone: each tick runs once, a backfill included)."""
        ids = {
            (manual_job_id(spec.name, t) if kind == "trigger" else tick_job_id(spec.name, t)): t
            for t in ticks
        }
        with session_scope(self.url) as session:
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
                    owner=self.owner,
                    lease_until=now + self.lease,
                    claimed_at=now,
                )
                for job_id, tick in ids.items()
                if job_id not in taken
            ]
            session.add_all(rows)
        return rows


def _rowcount(result: Result[*tuple[Any, ...]]) -> int:
    """Rows an UPDATE matched. Session.execute is typed as returning a plain Result, but for an
    UPDATE it is the driver's CursorResult, which alone has a rowcount."""
    assert isinstance(result, CursorResult)
    return result.rowcount


def _state_row(session: Session, name: str, now: datetime) -> ScheduleState:
    state = session.get(ScheduleState, name)
    if state is None:
        state = ScheduleState(name=name, cursor=now, updated_at=now)
        session.add(state)
    return state


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def list_schedules(*, job_states: bool = True, url: str | None = None) -> list[dict[str, Any]]:
    """Every declared schedule: spec, zone, paused, next and last fire, the last job's state."""
    now = utcnow()
    specs: list[tuple[Schedule, str | None]] = []
    for declared in schedule_registry.declared():
        try:
            specs.append((with_env(declared), None))
        except ScheduleError as exc:  # shown, so that an operator sees why it does not fire
            specs.append((replace(declared, enabled=False), str(exc)))
    with session_scope(url) as session:
        states = {s.name: s for s in session.scalars(select(ScheduleState))}
    out = []
    for spec, error in specs:
        state = states.get(spec.name)
        paused = bool(state and state.paused)
        item = spec.as_dict()
        item.update(
            error=error,
            paused=paused,
            next_fire=_iso(spec.next_fire(now)) if spec.enabled and not paused else None,
            last_tick_at=_iso(state.last_tick_at) if state else None,
            last_fired_at=_iso(state.last_fired_at) if state else None,
            last_job_id=state.last_job_id if state else None,
            last_job_state=None,
            fired=state.fired if state else 0,
            skipped_overlap=state.skipped_overlap if state else 0,
            skipped_catchup=state.skipped_catchup if state else 0,
        )
        if job_states and state is not None and state.last_job_id:
            try:
                found = _status(state.last_job_id)
            except Exception as exc:  # an engine down must not hide the list
                item["last_job_state"] = f"unknown ({type(exc).__name__})"
            else:
                item["last_job_state"] = found.state if found is not None else "not found"
        out.append(item)
    return out


def pause_schedule(name: str, *, url: str | None = None) -> dict[str, Any]:
    """Stop firing `name` until resumed (kept in the database: survives restarts)."""
    schedule_registry.get(name)
    now = utcnow()
    with session_scope(url) as session:
        state = _state_row(session, name, now)
        state.paused, state.paused_at, state.updated_at = True, now, now
    return {"name": name, "paused": True}


def resume_schedule(name: str, *, url: str | None = None) -> dict[str, Any]:
    """Fire `name` again from now on; the ticks that fell in the pause are not fired."""
    schedule_registry.get(name)
    now = utcnow()
    with session_scope(url) as session:
        state = _state_row(session, name, now)
        state.paused, state.paused_at, state.cursor, state.updated_at = False, None, now, now
    return {"name": name, "paused": False}


def trigger_schedule(name: str, *, url: str | None = None) -> dict[str, Any]:
    """One run of `name`'s job now, outside its timetable (overlap policy not applied)."""
    spec = schedule_registry.get(name)
    scheduler = Scheduler(url=url, role="trigger")
    now = utcnow()
    (row,) = scheduler.claim(spec, "trigger", [now], now)
    outcome = scheduler.process(row, spec, now)
    return {"name": name, "job_id": row.job_id, "outcome": outcome}


def backfill_schedule(
    name: str, start: datetime, end: datetime, *, url: str | None = None
) -> dict[str, Any]:
    """Fire every tick of `name` in [start, end] that never fired (each tick runs once, ever)."""
    spec = schedule_registry.get(name)
    now = utcnow()
    if start.tzinfo is None or end.tzinfo is None:
        raise ScheduleError("backfill: start and end need a time zone (e.g. 2026-11-01T00:00Z)")
    if not start <= end:
        raise ScheduleError("backfill: start must not be after end")
    if end > now:
        raise ScheduleError("backfill: end is in the future; future ticks fire on their own")
    ticks = spec.fire_times(start - _US, end, limit=MAX_BACKFILL + 1)
    if len(ticks) > MAX_BACKFILL:
        raise ScheduleError(f"backfill: more than {MAX_BACKFILL} ticks; split the range")
    scheduler = Scheduler(url=url, role="backfill")
    rows = scheduler.claim(spec, "backfill", ticks, now)
    outcomes = {row.job_id: scheduler.process(row, spec, now) for row in rows}
    return {
        "name": name,
        "ticks": len(ticks),
        "already_fired": len(ticks) - len(rows),
        "jobs": outcomes,
    }


# --- running it --------------------------------------------------------------------------------


def run_forever(stop: threading.Event, scheduler: Scheduler | None = None) -> None:
    """Pass after pass until `stop`; a database it cannot reach is logged once and retried."""
    failing: str | None = None
    while not stop.is_set():
        try:
            scheduler = scheduler or Scheduler()
            delay = scheduler.run_once()
        except Exception as exc:  # never let the scheduler take its host process down
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if failing is None:
                log.warning(
                    "scheduler cannot work (%s); retrying every %ss (is the database at %s "
                    "reachable and migrated with `jobyard db upgrade`?)",
                    reason,
                    env.get(env.SCHEDULER_POLL),
                    env.DATABASE_URL,
                )
            failing = reason
            delay = float(env.get(env.SCHEDULER_POLL) or 1)
        else:
            if failing is not None:
                log.info("scheduler working again")
                failing = None
        stop.wait(delay)


def start_scheduler_thread(
    stop: threading.Event, role: str = "scheduler"
) -> threading.Thread | None:
    """Start the scheduler in a daemon thread unless `JOBYARD_SCHEDULER=false`."""
    try:
        if not env.get_bool(env.SCHEDULER):
            return None
        scheduler = Scheduler(role=role)
    except Exception as exc:  # bad settings: say so, keep the host process running
        log.error("scheduler not started: %s", exc)
        return None
    thread = threading.Thread(
        target=run_forever, args=(stop, scheduler), name="jobyard-scheduler", daemon=True
    )
    thread.start()
    log.info("scheduler started (%s)", scheduler.owner)
    return thread


__all__ = [
    "Scheduler",
    "backfill_schedule",
    "list_schedules",
    "pause_schedule",
    "resume_schedule",
    "run_forever",
    "start_scheduler_thread",
    "trigger_schedule",
]

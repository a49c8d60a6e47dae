"""Operations on schedules, for the CLI (`jobyard schedules`) and the admin API: list, pause,
resume, trigger, backfill."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobyard.dispatcher.scheduling.engines import job_status
from jobyard.dispatcher.scheduling.passes import Scheduler
from jobyard.dispatcher.scheduling.rows import MICROSECOND
from jobyard.job_engine.db import session_scope, utcnow
from jobyard.job_engine.db.models import ScheduleState
from jobyard.job_engine.schedules import Schedule, ScheduleError, schedule_registry, with_env

#: Most ticks one backfill may ask for.
MAX_BACKFILL = 1000


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
                found = job_status(state.last_job_id)
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
    ticks = spec.fire_times(start - MICROSECOND, end, limit=MAX_BACKFILL + 1)
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

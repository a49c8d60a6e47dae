"""Schedules: a job fired on a cron expression or an interval, declared next to the jobs.

    from jobyard.job_engine import schedule

    schedule("reports.nightly", "analytics.daily_report", cron="0 6 * * *")
    schedule("cache.refresh", "shop.refresh_cache", every=300, payload={"full": False})

This module only declares schedules and computes their fire times (pure functions, no I/O): the
scheduler loop that claims and dispatches ticks is `jobyard.dispatcher.scheduler`.

Fire times:

* `cron` is a standard 5-field expression, read in `timezone` (an IANA name) by cronsim, which
  treats daylight-saving transitions like Debian's cron: a time that does not exist on the
  spring-forward day (02:30 in America/New_York) fires once, right after the jump (03:00 local);
  a time that exists twice on the fall-back day fires once, at its first occurrence. Patterns
  that fire every hour (`30 * * * *`) fire in both repeated hours: they are intervals, not
  wall-clock appointments.
* `every` is a period in seconds (at least 1), anchored at the Unix epoch, so every process
  computes the same ticks without talking to the others.

Each schedule may be switched off or re-timed without code: `JOBYARD_SCHEDULE_<NAME>` (the name
upper-cased, every other character `_`) set to `off`, to a 5-field cron expression, or to a
whole number of seconds (an interval).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

OVERLAP_POLICIES = ("skip", "buffer_one", "allow_all")
SCHEDULE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
ENV_PREFIX = "JOBYARD_SCHEDULE_"
MIN_EVERY = timedelta(seconds=1)
MIN_CATCHUP_WINDOW = timedelta(seconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


class ScheduleError(ValueError):
    """A schedule declaration (or its env override) that cannot work."""


def env_key(name: str) -> str:
    """`maintenance.token_cleanup` -> `JOBYARD_SCHEDULE_MAINTENANCE_TOKEN_CLEANUP`."""
    return ENV_PREFIX + "".join(ch if ch.isalnum() else "_" for ch in name).upper()


def _check_cron(expr: str, where: str) -> str:
    expr = " ".join(expr.split())
    if len(expr.split(" ")) != 5:
        raise ScheduleError(f"{where}: cron {expr!r} must have 5 fields (min hour dom mon dow)")
    try:
        CronSim(expr, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ScheduleError(f"{where}: invalid cron {expr!r}: {exc}") from None
    return expr


def _check_every(every: Any, where: str) -> timedelta:
    if isinstance(every, bool) or not isinstance(every, int | float | timedelta):
        raise ScheduleError(f"{where}: every={every!r} must be seconds or a timedelta")
    period = every if isinstance(every, timedelta) else timedelta(seconds=every)
    if period < MIN_EVERY:
        raise ScheduleError(f"{where}: every={every!r} is shorter than 1 second")
    return period


@dataclass(frozen=True)
class Schedule:
    name: str
    job: str
    cron: str | None = None
    every: timedelta | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    overlap: str = "skip"
    catchup_window: timedelta | None = None
    enabled: bool = True  # False when switched off by JOBYARD_SCHEDULE_<NAME>=off

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def spec(self) -> str:
        """The timing as people write it: the cron expression or `every <n>s`."""
        if self.cron is not None:
            return self.cron
        assert self.every is not None
        seconds = self.every.total_seconds()
        return f"every {seconds:g}s"

    def next_fire(self, after: datetime) -> datetime:
        """The first tick strictly after `after` (aware), in UTC."""
        after = _aware(after)
        if self.every is not None:
            period = self.every // _US
            elapsed = (after - _EPOCH) // _US
            return _EPOCH + _US * ((elapsed // period + 1) * period)
        assert self.cron is not None
        start = after
        while True:
            # cronsim works on the wall clock in `zone`: converting from UTC picks the right
            # side (fold) of a repeated hour, so the answer is after `after` in real time.
            tick = next(CronSim(self.cron, start.astimezone(self.zone))).astimezone(UTC)
            if tick > after:
                return tick
            start = start + timedelta(minutes=1)  # a repeated wall-clock hour; look past it

    def fire_times(self, after: datetime, until: datetime, limit: int = 10_000) -> list[datetime]:
        """Ticks in (after, until], oldest first, at most `limit` of them."""
        ticks: list[datetime] = []
        until = _aware(until)
        tick = self.next_fire(after)
        while tick <= until and len(ticks) < limit:
            ticks.append(tick)
            tick = self.next_fire(tick)
        return ticks

    def span(self, after: datetime, until: datetime) -> tuple[int, datetime | None]:
        """How many ticks fall in (after, until], and the last of them."""
        until = _aware(until)
        first = self.next_fire(after)
        if first > until:
            return 0, None
        if self.every is not None:  # arithmetic: a long outage of a short interval stays cheap
            count = (until - first) // self.every + 1
            return count, first + self.every * (count - 1)
        count, last, tick = 0, first, first
        while tick <= until:
            count, last = count + 1, tick
            tick = self.next_fire(tick)
        return count, last

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "job": self.job,
            "spec": self.spec,
            "cron": self.cron,
            "every": self.every.total_seconds() if self.every is not None else None,
            "timezone": self.timezone,
            "overlap": self.overlap,
            "catchup_window": (
                self.catchup_window.total_seconds() if self.catchup_window is not None else None
            ),
            "payload": self.payload,
            "enabled": self.enabled,
        }


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ScheduleError(f"naive datetime {moment.isoformat()}: use an aware one (UTC)")
    return moment.astimezone(UTC)


def tick_stamp(tick: datetime) -> str:
    """A tick as compact UTC text for job ids: 20261126T060000Z (microseconds when present)."""
    tick = _aware(tick)
    text = tick.strftime("%Y%m%dT%H%M%S")
    if tick.microsecond:
        text += f".{tick.microsecond:06d}"
    return text + "Z"


def tick_job_id(name: str, tick: datetime) -> str:
    """The job id of one tick: the same in every process, so a tick can start one job only."""
    return f"schedule:{name}:{tick_stamp(tick)}"


def manual_job_id(name: str, moment: datetime) -> str:
    """The job id of a `trigger` (a run outside the timetable)."""
    return f"schedule:{name}:manual:{tick_stamp(moment)}"


def build(
    name: str,
    job: str,
    *,
    cron: str | None = None,
    every: float | timedelta | None = None,
    payload: dict[str, Any] | None = None,
    timezone: str = "UTC",
    overlap: str = "skip",
    catchup_window: float | timedelta | None = None,
) -> Schedule:
    """A checked Schedule (no env override applied)."""
    if not isinstance(name, str) or not SCHEDULE_NAME_PATTERN.fullmatch(name):
        raise ScheduleError(
            f"invalid schedule name {name!r}: 1-100 letters, digits and ._- starting with a "
            "letter or digit"
        )
    where = f"schedule {name!r}"
    if not isinstance(job, str) or not job:
        raise ScheduleError(f"{where}: job must be a job name")
    if (cron is None) == (every is None):
        raise ScheduleError(f"{where}: give exactly one of cron= and every=")
    if payload is not None and not isinstance(payload, dict):
        raise ScheduleError(f"{where}: payload must be a dict")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ScheduleError(f"{where}: unknown time zone {timezone!r} (use an IANA name)") from None
    if overlap not in OVERLAP_POLICIES:
        raise ScheduleError(f"{where}: overlap={overlap!r}; use one of {OVERLAP_POLICIES}")
    window = None
    if catchup_window is not None:
        window = _check_every(catchup_window, where + " catchup_window")
    return Schedule(
        name=name,
        job=job,
        cron=_check_cron(cron, where) if cron is not None else None,
        every=_check_every(every, where) if every is not None else None,
        payload=dict(payload or {}),
        timezone=timezone,
        overlap=overlap,
        catchup_window=window,
    )


def with_env(declared: Schedule) -> Schedule:
    """The schedule as `JOBYARD_SCHEDULE_<NAME>` says: off, another cron, or an interval."""
    key = env_key(declared.name)
    raw = (os.environ.get(key) or "").strip()
    if not raw:
        return declared
    if raw.lower() in ("off", "false", "0", "disabled"):
        return replace(declared, enabled=False)
    if raw.isdigit():
        return replace(declared, cron=None, every=_check_every(int(raw), key), enabled=True)
    return replace(declared, cron=_check_cron(raw, key), every=None, enabled=True)


class ScheduleRegistry:
    def __init__(self) -> None:
        self._schedules: dict[str, Schedule] = {}

    def add(self, declared: Schedule) -> Schedule:
        existing = self._schedules.get(declared.name)
        if existing is not None and existing != declared:
            raise ScheduleError(f"schedule {declared.name!r} is declared twice")
        self._schedules[declared.name] = declared
        return declared

    def declared(self) -> list[Schedule]:
        from jobyard.job_engine.registry import load_job_modules

        load_job_modules()
        return sorted(self._schedules.values(), key=lambda s: s.name)

    def effective(self) -> list[Schedule]:
        """Every declared schedule with its env override applied (disabled ones included)."""
        return [with_env(s) for s in self.declared()]

    def get(self, name: str) -> Schedule:
        for found in self.effective():
            if found.name == name:
                return found
        known = ", ".join(s.name for s in self.declared()) or "none"
        raise ScheduleError(f"unknown schedule {name!r} (declared: {known})")

    def __iter__(self) -> Iterator[Schedule]:
        return iter(self.effective())


schedule_registry = ScheduleRegistry()


def schedule(
    name: str,
    job: str,
    *,
    cron: str | None = None,
    every: float | timedelta | None = None,
    payload: dict[str, Any] | None = None,
    timezone: str = "UTC",
    overlap: str = "skip",
    catchup_window: float | timedelta | None = None,
) -> Schedule:
    """Declare that job `job` runs with `payload` on `cron` (in `timezone`) or `every` seconds.

    `overlap`: what a tick does while the previous tick's job is still queued or running:
    `skip` it (counted), `buffer_one` (run it when the previous finishes; later ticks meanwhile
    are skipped) or `allow_all`. `catchup_window`: after every scheduler was down, missed ticks
    younger than this fire once each, in order, and older ones are skipped (counted); without a
    window only the latest missed tick fires. Call it at import time of a job module.
    """
    return schedule_registry.add(
        build(
            name,
            job,
            cron=cron,
            every=every,
            payload=payload,
            timezone=timezone,
            overlap=overlap,
            catchup_window=catchup_window,
        )
    )


__all__ = [
    "OVERLAP_POLICIES",
    "Schedule",
    "ScheduleError",
    "ScheduleRegistry",
    "build",
    "env_key",
    "manual_job_id",
    "schedule",
    "schedule_registry",
    "tick_job_id",
    "tick_stamp",
    "with_env",
]

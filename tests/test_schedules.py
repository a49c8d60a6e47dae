"""Schedules: fire times (pure, across daylight-saving transitions), declarations, env overrides,
the SQL tick claim under racing schedulers, overlap `skip` with real processes, and the
operations of `jobyard schedules`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from jobyard.dispatcher.dispatch import JOB_ID_PATTERN
from jobyard.dispatcher.scheduler import Scheduler
from jobyard.job_engine import ScheduleError, schedule_registry
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import ScheduleState, ScheduleTick
from jobyard.job_engine.schedules import build, env_key, tick_job_id, with_env
from tests.engines import Engines
from tests.support import ROOT, Proc, migrated_pg_database, wait_for

NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _day(spec_zone: ZoneInfo, year: int, month: int, day: int) -> tuple[datetime, datetime]:
    """The UTC bounds of a local calendar day (23, 24 or 25 hours long)."""
    start = datetime(year, month, day, tzinfo=spec_zone)
    end = start + timedelta(days=1)  # wall-clock arithmetic: the next local midnight
    return start.astimezone(UTC), end.astimezone(UTC)


# --- fire times -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "cron", "day", "expected_utc"),
    [
        # America/New_York springs forward at 02:00 -> 03:00 on 2026-03-08: 02:30 does not
        # exist and fires once, right after the jump (03:00 EDT = 07:00 UTC).
        (NEW_YORK, "30 2 * * *", (2026, 3, 8), [_utc(2026, 3, 8, 7, 0)]),
        # Falls back 02:00 -> 01:00 on 2026-11-01: 02:30 exists once (EST), fires once.
        (NEW_YORK, "30 2 * * *", (2026, 11, 1), [_utc(2026, 11, 1, 7, 30)]),
        # 01:30 exists twice that day: fired once, at its first occurrence (EDT).
        (NEW_YORK, "30 1 * * *", (2026, 11, 1), [_utc(2026, 11, 1, 5, 30)]),
        # Europe/London springs forward 01:00 -> 02:00 on 2026-03-29: 01:30 fires at 02:00 BST.
        (LONDON, "30 1 * * *", (2026, 3, 29), [_utc(2026, 3, 29, 1, 0)]),
        # Falls back 02:00 -> 01:00 on 2026-10-25: 01:30 fires once, the first time (BST).
        (LONDON, "30 1 * * *", (2026, 10, 25), [_utc(2026, 10, 25, 0, 30)]),
    ],
)
def test_daily_fire_times_across_daylight_saving_transitions(
    zone: ZoneInfo, cron: str, day: tuple[int, int, int], expected_utc: list[datetime]
) -> None:
    spec = build("dst", "system.echo", cron=cron, timezone=zone.key)
    start, end = _day(zone, *day)
    assert spec.fire_times(start - timedelta(microseconds=1), end) == expected_utc
    # The day before and after fire once too, at the same wall-clock time.
    for offset in (-1, 1):
        other = spec.fire_times(start + timedelta(days=offset), end + timedelta(days=offset))
        assert len(other) == 1
        assert other[0].astimezone(zone).strftime("%H:%M") == cron_time(cron)


def cron_time(cron: str) -> str:
    minute, hour = cron.split()[:2]
    return f"{int(hour):02d}:{int(minute):02d}"


@pytest.mark.parametrize(
    ("zone", "spring", "fall"),
    [(NEW_YORK, (2026, 3, 8), (2026, 11, 1)), (LONDON, (2026, 3, 29), (2026, 10, 25))],
)
def test_hourly_schedules_follow_real_hours_across_transitions(
    zone: ZoneInfo, spring: tuple[int, int, int], fall: tuple[int, int, int]
) -> None:
    spec = build("hourly", "system.echo", cron="15 * * * *", timezone=zone.key)
    short = spec.fire_times(*_day(zone, *spring))
    long = spec.fire_times(*_day(zone, *fall))
    assert (len(short), len(long)) == (23, 25)
    for ticks in (short, long):
        gaps = {b - a for a, b in pairwise(ticks)}
        assert gaps == {timedelta(hours=1)}  # never twice in an hour, never a missed hour


def test_next_fire_is_strictly_after_and_interval_ticks_are_anchored_at_the_epoch() -> None:
    cron = build("c", "system.echo", cron="0 6 * * 1")
    monday = _utc(2026, 11, 30, 6, 0)
    assert cron.next_fire(monday - timedelta(seconds=1)) == monday
    assert cron.next_fire(monday) == monday + timedelta(days=7)
    every = build("e", "system.echo", every=timedelta(seconds=90))
    assert every.next_fire(_utc(2026, 1, 1, 0, 0, 1)) == _utc(2026, 1, 1, 0, 1, 30)
    assert every.fire_times(_utc(2026, 1, 1), _utc(2026, 1, 1, 0, 5)) == [
        _utc(2026, 1, 1, 0, 1, 30),
        _utc(2026, 1, 1, 0, 3),
        _utc(2026, 1, 1, 0, 4, 30),
    ]
    # A year-long outage of a 1 s schedule is counted arithmetically, not tick by tick.
    one_second = build("s", "system.echo", every=1)
    count, last = one_second.span(_utc(2025, 1, 1), _utc(2026, 1, 1))
    assert (count, last) == (365 * 86400, _utc(2026, 1, 1))


def test_tick_job_ids_are_deterministic_and_valid_job_ids() -> None:
    tick = _utc(2026, 11, 26, 6, 0)
    job_id = tick_job_id("analytics.daily_report", tick)
    assert job_id == "schedule:analytics.daily_report:20261126T060000Z"
    assert tick_job_id("analytics.daily_report", tick.astimezone(NEW_YORK)) == job_id
    assert JOB_ID_PATTERN.fullmatch(job_id)
    assert JOB_ID_PATTERN.fullmatch(tick_job_id("x", tick + timedelta(microseconds=5)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "0 6 * *"}, "5 fields"),
        ({"cron": "0 0 6 * * *"}, "5 fields"),
        ({"cron": "61 * * * *"}, "invalid cron"),
        ({"every": 0.5}, "shorter than 1 second"),
        ({"every": "10"}, "seconds or a timedelta"),
        ({}, "exactly one of"),
        ({"cron": "* * * * *", "every": 5}, "exactly one of"),
        ({"every": 5, "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"every": 5, "overlap": "queue"}, "overlap="),
        ({"every": 5, "catchup_window": 0}, "shorter than 1 second"),
    ],
)
def test_bad_declarations_fail_at_import_with_a_clear_error(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ScheduleError, match=message):
        build("ok.name", "system.echo", **kwargs)


def test_bad_names_are_refused() -> None:
    with pytest.raises(ScheduleError, match="invalid schedule name"):
        build("no spaces", "system.echo", every=5)


def test_built_in_schedules_and_their_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = {s.name: s for s in schedule_registry.declared()}
    assert {
        name: (s.job, s.spec)
        for name, s in specs.items()
        if "." in name and not name.startswith("test.")
    } == {
        "maintenance.token_cleanup": ("maintenance.token_cleanup", "0 * * * *"),
        "maintenance.file_cleanup": ("maintenance.file_cleanup", "30 3 * * *"),
        "analytics.daily_report": ("analytics.daily_report", "0 6 * * *"),
        "analytics.weekly_report": ("analytics.weekly_report", "0 6 * * 1"),
    }
    daily = specs["analytics.daily_report"]
    assert env_key(daily.name) == "JOBYARD_SCHEDULE_ANALYTICS_DAILY_REPORT"
    monkeypatch.setenv(env_key(daily.name), "off")
    assert not with_env(daily).enabled
    monkeypatch.setenv(env_key(daily.name), "30 7 * * *")
    assert with_env(daily).spec == "30 7 * * *"
    monkeypatch.setenv(env_key(daily.name), "600")
    assert with_env(daily).every == timedelta(minutes=10)
    monkeypatch.setenv(env_key(daily.name), "at noon")
    with pytest.raises(ScheduleError, match="JOBYARD_SCHEDULE_ANALYTICS_DAILY_REPORT"):
        with_env(daily)


# --- the SQL claim ----------------------------------------------------------------------------


def _fires(schedule: str, outcome: str) -> float:
    """This process's jobyard_schedule_fires_total{schedule, outcome}."""
    value = REGISTRY.get_sample_value(
        "jobyard_schedule_fires_total", {"schedule": schedule, "outcome": outcome}
    )
    return value or 0.0


@pytest.fixture
def test_schedules(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Declare tests/schedule_jobs.py's schedules here and in every process started after this;
    the built-in ones off, so that no report or cleanup fires into the test."""
    if "jobyard_env" in request.fixturenames:
        request.getfixturevalue("jobyard_env")  # it sets JOBYARD_JOB_MODULES too: go after it
    monkeypatch.setenv("JOBYARD_JOB_MODULES", "tests.jobs,tests.schedule_jobs")
    for name in (
        "maintenance.token_cleanup",
        "maintenance.file_cleanup",
        "analytics.daily_report",
        "analytics.weekly_report",
    ):
        monkeypatch.setenv(env_key(name), "off")


def test_racing_schedulers_claim_and_dispatch_each_tick_once(
    monkeypatch: pytest.MonkeyPatch, test_schedules: None
) -> None:
    """Eight schedulers on one PostgreSQL database, in threads, each running a pass at every
    one of 60 simulated ticks at the same moment: the dispatch callable (the engines' stand-in
    here, so that every call is counted rather than deduplicated by an engine) is called once
    per tick."""
    monkeypatch.setenv("JOBYARD_SCHEDULE_TEST_WINDOW", "off")
    monkeypatch.setenv("JOBYARD_SCHEDULE_TEST_OVERLAP", "off")
    fired_before = _fires("test.every2", "fired")
    calls: list[str] = []
    lock = threading.Lock()

    class Handle:
        engine = "dramatiq"

    def dispatch(name: str, payload: dict[str, Any], job_id: str) -> Handle:
        with lock:
            calls.append(job_id)
        return Handle()

    start = _utc(2026, 1, 1)
    with migrated_pg_database("jobyard_test_claim") as url:
        schedulers = [
            Scheduler(url=url, dispatch=dispatch, status=lambda _id: None) for _ in range(8)
        ]
        schedulers[0].run_once(start)  # first sight: the schedule starts here

        barrier = threading.Barrier(len(schedulers))

        def run(scheduler: Scheduler) -> None:
            for step in range(1, 61):
                barrier.wait(30)  # every scheduler wakes for the same tick
                scheduler.run_once(start + timedelta(seconds=2 * step))

        threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with session_scope(url) as session:
            rows = list(session.scalars(select(ScheduleTick)))
            state = session.get(ScheduleState, "test.every2")
    expected = {tick_job_id("test.every2", start + timedelta(seconds=2 * s)) for s in range(1, 61)}
    assert Counter(calls) == Counter(expected), sorted(Counter(calls).items())[-3:]
    assert {r.job_id for r in rows} == expected
    assert {r.state for r in rows} == {"dispatched"}
    assert state is not None and state.fired == 60
    assert _fires("test.every2", "fired") - fired_before == 60


def test_no_window_fires_only_the_latest_missed_tick_and_counts_the_rest(
    monkeypatch: pytest.MonkeyPatch, test_schedules: None, job_log_database: str
) -> None:
    """Every scheduler was down for 100 s: test.every2 (no window) fires its latest tick only,
    test.window (10 s) the ticks of its last 10 s; the others are counted as skipped."""
    monkeypatch.setenv("JOBYARD_SCHEDULE_TEST_OVERLAP", "off")
    monkeypatch.setenv("JOBYARD_SCHEDULER_GRACE", "1")
    calls: list[str] = []

    class Handle:
        engine = "temporal"

    def dispatch(name: str, payload: dict[str, Any], job_id: str) -> Handle:
        calls.append(job_id)
        return Handle()

    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=30)
    start -= timedelta(seconds=start.second % 2)  # on the every=2 grid
    scheduler = Scheduler(url=job_log_database, dispatch=dispatch, status=lambda _id: None)
    with session_scope(job_log_database) as session:
        for name in ("test.every2", "test.window"):
            state = session.get(ScheduleState, name) or ScheduleState(name=name, cursor=start)
            state.cursor, state.paused, state.skipped_catchup = start, False, 0
            session.merge(state)
    later = start + timedelta(seconds=100)
    skipped_before = _fires("test.window", "skipped_catchup")
    scheduler.run_once(later)
    ours = [c for c in calls if c.startswith("schedule:test.every2:")]
    assert ours == [tick_job_id("test.every2", later)]
    window = sorted(c for c in calls if c.startswith("schedule:test.window:"))
    # 10 s window and the 5 s grace: ticks at later-10 .. later.
    assert window == [
        tick_job_id("test.window", later - timedelta(seconds=s)) for s in (10, 8, 6, 4, 2, 0)
    ]
    with session_scope(job_log_database) as session:
        assert session.get(ScheduleState, "test.every2").skipped_catchup == 49
        assert session.get(ScheduleState, "test.window").skipped_catchup == 44
    assert _fires("test.window", "skipped_catchup") - skipped_before == 44


# --- real processes ---------------------------------------------------------------------------


def _runs(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    return [(line.split()[0], float(line.split()[1])) for line in path.read_text().splitlines()]


@pytest.mark.timeout(240)
def test_overlap_skip_with_a_job_longer_than_the_period(
    monkeypatch: pytest.MonkeyPatch,
    test_schedules: None,
    engines: Engines,
    tmp_path: Path,
    job_log_database: str,
) -> None:
    """test.overlap fires every 2 s a job that runs 5 s: while one runs, ticks are skipped and
    counted; the next tick after it finished fires."""
    for key, value in {
        "SCHEDULE_TEST_DIR": str(tmp_path),
        "JOBYARD_SCHEDULER": "true",
        "JOBYARD_SCHEDULE_TEST_EVERY2": "off",
        "JOBYARD_SCHEDULE_TEST_WINDOW": "off",
    }.items():
        monkeypatch.setenv(key, value)
    with session_scope(job_log_database) as session:  # a fresh start for this schedule
        state = session.get(ScheduleState, "test.overlap")
        if state is not None:
            session.delete(state)
    # The worker first, then the scheduler: a tick fired before any worker is live would go to
    # Temporal, where no worker runs here, and (rightly) keep every later tick skipped.
    worker = Proc(["worker", "--processes", "1"], {**os.environ, "JOBYARD_SCHEDULER": "false"})
    engines._procs.append(worker)
    engines.wait_for_workers(["scheduled"], worker, timeout=90)  # a busy machine is slow
    engines._procs.append(Proc(["scheduler"], dict(os.environ)))
    record = tmp_path / "overlap.log"
    try:
        wait_for(lambda: _runs(record), timeout=90, interval=0.2)  # its scheduler is up
        wait_for(lambda: len(_runs(record)) >= 3, timeout=40, interval=0.2)
    except AssertionError:
        with session_scope(job_log_database) as session:
            ticks = [
                (t.job_id, t.state, t.engine, t.error)
                for t in session.scalars(select(ScheduleTick))
            ]
            states = [(s.name, s.cursor, s.fired) for s in session.scalars(select(ScheduleState))]
        raise AssertionError(
            f"runs: {_runs(record)}\nticks: {ticks}\nstates: {states}\n{engines.logs()}"
        ) from None
    runs = _runs(record)
    starts = [started for _, started in runs]
    assert len({job_id for job_id, _ in runs}) == len(runs)  # no tick ran twice
    for before, after in pairwise(starts):
        assert after - before >= 5, starts  # never two runs at once
    with session_scope(job_log_database) as session:
        state = session.get(ScheduleState, "test.overlap")
        skipped = list(
            session.scalars(
                select(ScheduleTick).where(
                    ScheduleTick.schedule == "test.overlap", ScheduleTick.state == "skipped"
                )
            )
        )
    assert state is not None and state.skipped_overlap >= 3 and len(skipped) >= 3
    assert all("still running" in (row.error or "") for row in skipped)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobyard.cli", "schedules", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=ROOT,
        timeout=60,
    )


@pytest.mark.timeout(240)
def test_schedules_commands_pause_resume_trigger_backfill(
    monkeypatch: pytest.MonkeyPatch,
    test_schedules: None,
    engines: Engines,
    tmp_path: Path,
    job_log_database: str,
) -> None:
    monkeypatch.setenv("SCHEDULE_TEST_DIR", str(tmp_path))
    worker = Proc(["worker", "--processes", "1"], dict(os.environ))  # its scheduler is off
    engines._procs.append(worker)
    engines.worker = worker
    engines.wait_for_workers(["scheduled"], worker, timeout=90)

    paused = _cli("pause", "test.every2")
    assert paused.returncode == 0, paused.stderr
    listed = json.loads(_cli("list", "--json").stdout)  # another process: it is in the database
    item = next(i for i in listed if i["name"] == "test.every2")
    assert item["paused"] is True and item["next_fire"] is None and item["spec"] == "every 2s"
    assert _cli("resume", "test.every2").returncode == 0
    item = next(i for i in json.loads(_cli("list", "--json").stdout) if i["name"] == "test.every2")
    assert item["paused"] is False and item["next_fire"] is not None
    assert "test.every2" in _cli("list").stdout

    triggered = _cli("trigger", "test.every2")
    assert triggered.returncode == 0, triggered.stderr
    job_id = json.loads(triggered.stdout)["job_id"]
    assert job_id.startswith("schedule:test.every2:manual:")
    engines.wait(job_id)
    assert [j for j, _ in _runs(tmp_path / "every2.log")] == [job_id]

    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    start = end - timedelta(seconds=9)
    window = ["--start", start.isoformat(), "--end", end.isoformat()]
    first = json.loads(_cli("backfill", "test.every2", *window).stdout)
    assert first["ticks"] == 5 and first["already_fired"] == 0
    again = json.loads(_cli("backfill", "test.every2", *window).stdout)
    assert again["ticks"] == 5 and again["already_fired"] == 5 and again["jobs"] == {}
    for backfilled in first["jobs"]:
        engines.wait(backfilled)
    runs = Counter(j for j, _ in _runs(tmp_path / "every2.log"))
    assert set(runs) == {job_id, *first["jobs"]} and set(runs.values()) == {1}

    bad = _cli("backfill", "test.every2", "--start", end.isoformat(), "--end", start.isoformat())
    assert bad.returncode == 2 and "start must not be after end" in bad.stderr
    unknown = _cli("pause", "no.such.schedule")
    assert unknown.returncode == 2 and "unknown schedule" in unknown.stderr

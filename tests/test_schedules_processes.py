"""Schedules with real processes: two `jobyard worker` and one `jobyard temporal-worker`, each
running a scheduler, fire every=2 schedules for 30 s. One scheduler is killed, Redis is stopped
(SIGSTOP) for 10 s; then every scheduler is stopped for 20 s and one `jobyard scheduler` catches
up. Every run is counted from the append-only record the job writes (tests/schedule_jobs.py)."""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from jobyard.job_engine.db import dispose_engines, session_scope
from jobyard.job_engine.db.models import ScheduleState, ScheduleTick
from tests.engines import Engines
from tests.support import Proc, RedisServer, migrated_pg_database, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
PERIOD = 2.0
LEASE = 5.0


def _tick(job_id: str) -> datetime:
    stamp = job_id.rsplit(":", 1)[1]
    return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def _runs(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    return [(line.split()[0], float(line.split()[1])) for line in path.read_text().splitlines()]


def _ticks(url: str, schedule: str) -> dict[str, ScheduleTick]:
    with session_scope(url) as session:
        rows = session.scalars(select(ScheduleTick).where(ScheduleTick.schedule == schedule))
        return {row.job_id: row for row in rows}


def _state(url: str, schedule: str) -> ScheduleState:
    with session_scope(url) as session:
        state = session.get(ScheduleState, schedule)
        assert state is not None
        return state


def _grid(start: float, end: float) -> list[datetime]:
    """Every tick of an every=2 schedule in [start, end] (unix seconds)."""
    first = int(start // PERIOD + 1) * PERIOD
    count = max(0, int((end - first) // PERIOD) + 1)
    return [datetime.fromtimestamp(first + PERIOD * i, UTC) for i in range(count)]


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else 0


def test_schedules_fire_once_per_tick_across_kills_redis_outage_and_catch_up(
    monkeypatch: pytest.MonkeyPatch,
    engines: Engines,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    with migrated_pg_database("jobyard_test_sched") as url:
        for key, value in {
            "DATABASE_URL": url,
            "SCHEDULE_TEST_DIR": str(records),
            "JOBYARD_JOB_MODULES": "tests.jobs,tests.schedule_jobs",
            "JOBYARD_SCHEDULER": "true",
            "JOBYARD_SCHEDULER_LEASE": str(LEASE),
            "JOBYARD_SCHEDULER_POLL": "0.5",
            "JOBYARD_SCHEDULE_TEST_OVERLAP": "off",
        }.items():
            monkeypatch.setenv(key, value)
        try:
            _run(engines, redis_server, url, records)
        finally:
            engines.close()
            dispose_engines(url)


def _run(engines: Engines, redis_server: RedisServer, url: str, records: Path) -> None:
    # --- phase A: three schedulers for 30 s, one killed, Redis stopped for 10 s ---
    began = time.time()
    # Started together: on a busy machine each takes seconds to import.
    first, second = (Proc(["worker", "--processes", "1"], dict(os.environ)) for _ in range(2))
    temporal = Proc(["temporal-worker"], dict(os.environ))
    # Runs Temporal's share of the jobs through phase B, when no scheduler may run.
    runner = Proc(["temporal-worker"], {**os.environ, "JOBYARD_SCHEDULER": "false"})
    engines._procs.extend([first, second, temporal, runner])
    for proc in (first, second):
        engines.wait_for_workers(["default", "data-sync", "scheduled"], proc, timeout=90)
    for proc in (temporal, runner):
        wait_for(lambda p=proc: "Temporal worker polling" in p.output(), timeout=90)
    start = time.time()
    print(f"\nphase A starts {start - began:.1f}s after the test")
    _sleep_until(start + 8)
    second.signal_group(signal.SIGKILL)  # a scheduler dies without a word, maybe mid-tick
    killed_at = time.time()
    _sleep_until(start + 14)
    redis_server.pause()
    paused_at = time.time()
    _sleep_until(paused_at + 10)
    redis_server.resume()
    resumed_at = time.time()
    _sleep_until(start + 30)
    phase_a_end = time.time()

    # --- phase B: no scheduler for 20 s; then one catches up ---
    for proc in (temporal, first):
        proc.proc.send_signal(signal.SIGTERM)
    for proc in (temporal, first):
        proc.stop()
    stopped_at = time.time()
    print(f"schedulers stopped {stopped_at - phase_a_end:.1f}s after phase A")
    _sleep_until(stopped_at + 20)
    restarted_at = time.time()
    scheduler = Proc(["scheduler"], {**os.environ, "JOBYARD_SCHEDULER_GRACE": "1"})
    engines._procs.append(scheduler)
    wait_for(lambda: _state(url, "test.window").skipped_catchup > 0, timeout=30)
    caught_up_at = time.time()
    print(f"caught up {caught_up_at - restarted_at:.1f}s after the restart")
    time.sleep(4)

    def settled() -> bool:
        dispatched = {
            job_id
            for name in ("test.every2", "test.window")
            for job_id, row in _ticks(url, name).items()
            if row.state == "dispatched"
        }
        logs = [records / "every2.log", records / "window.log"]
        ran = {job_id for path in logs for job_id, _ in _runs(path)}
        return dispatched <= ran

    wait_for(settled, timeout=40, interval=0.5)
    scheduler.stop()
    logs = engines.logs() + scheduler.output()[-3000:]

    every2 = _runs(records / "every2.log")
    window = _runs(records / "window.log")
    every2_ticks = _ticks(url, "test.every2")

    # Each tick ran once: no job id twice in the append-only record, on either engine.
    for name, runs in (("every2", every2), ("window", window)):
        twice = {job_id: n for job_id, n in Counter(j for j, _ in runs).items() if n > 1}
        assert not twice, f"{name}: ticks that ran more than once: {twice}\n{logs}"
    ran = {_tick(job_id): started for job_id, started in every2}

    # Phase A: no tick missing, through the kill and the Redis outage.
    first_tick = min(ran)
    expected = _grid(first_tick.timestamp() - 0.5, phase_a_end - 1)
    missing = [t.isoformat() for t in expected if t not in ran]
    assert not missing, f"ticks that never ran: {missing}\n{logs}"
    assert len(expected) >= 12

    # Ticks while Redis was stopped ran on Temporal (the dispatch's engine), once each.
    outage = [t for t in expected if paused_at + 1 < t.timestamp() < resumed_at - 1]
    assert len(outage) >= 3
    engines_used = {every2_ticks[f"schedule:test.every2:{t:%Y%m%dT%H%M%SZ}"].engine for t in outage}
    assert engines_used == {"temporal"}, engines_used
    assert {row.engine for row in every2_ticks.values()} == {"dramatiq", "temporal"}

    # The killed scheduler cost at most its lease: outside the Redis outage no tick is later.
    lags = {t: ran[t] - t.timestamp() for t in expected}
    calm = [lag for t, lag in lags.items() if not paused_at - 1 < t.timestamp() < resumed_at + 2]
    assert max(calm) < LEASE + 3, f"lags: {sorted(calm)[-5:]} (killed at {killed_at - start:.1f}s)"

    # The lag of each tick is taken from the job log once, whichever engine ran it.
    with_lag = [r for r in _ticks(url, "test.every2").values() if r.started_at is not None]
    assert len(with_lag) >= len(expected) // 2, len(with_lag)

    # Phase B, no window: of the ticks missed while no scheduler ran, only the latest fired.
    gap = _grid(stopped_at + 1, restarted_at - 2.5)
    assert len(gap) >= 8
    gap_runs = [t for t in gap if t in ran]
    assert gap_runs == [], gap_runs
    after = [t for t in ran if t.timestamp() > stopped_at + 1]
    assert after, "the restarted scheduler fired nothing"
    assert _state(url, "test.every2").skipped_catchup >= len(gap) - 1

    # Phase B, 10 s window: the missed ticks inside it fired once each; older ones skipped.
    window_ran = {_tick(job_id): started for job_id, started in window}
    window_ticks = _ticks(url, "test.window")
    caught = sorted(
        (row.tick_at, row.claimed_at)
        for row in window_ticks.values()
        if row.tick_at.timestamp() > stopped_at + 1
    )
    passed_at = caught[0][1].timestamp()  # the restarted scheduler's first pass
    assert passed_at - stopped_at >= 20
    inside = _grid(passed_at - 9.5, passed_at - 0.5)
    older = _grid(stopped_at + 1, passed_at - 10.5)
    assert len(inside) >= 4 and len(older) >= 4, (inside, older)
    assert all(t in window_ran for t in inside), (inside, sorted(window_ran)[-8:])
    assert not [t for t in older if t in window_ran]
    assert _state(url, "test.window").skipped_catchup >= len(older)

    all_lags = sorted(lags.values())
    print(
        f"\ntick lag (tick -> job start), {len(calm)} ticks outside the Redis outage: "
        f"p50 {_percentile(sorted(calm), 50) * 1000:.0f} ms, "
        f"p99 {_percentile(sorted(calm), 99) * 1000:.0f} ms; all {len(all_lags)} ticks: "
        f"p50 {_percentile(all_lags, 50) * 1000:.0f} ms, "
        f"p99 {_percentile(all_lags, 99) * 1000:.0f} ms"
    )

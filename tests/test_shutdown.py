"""Graceful shutdown of `jobyard worker` on SIGTERM, and `jobyard health`, on real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.support import ROOT, wait_for


def _lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_in_flight_jobs_finish_within_grace(engines, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKER_SHUTDOWN_GRACE", "10")
    worker = engines.start_worker(queues="default")
    handles = [
        engines.dispatch("dramatiq", "test.slow", {"seconds": 2, "marker_dir": str(tmp_path)})
        for _ in range(3)
    ]
    wait_for(lambda: _lines(tmp_path / "started") == 3, timeout=20)
    stopped_at = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(15) == 0, worker.output()
    assert time.monotonic() - stopped_at < 10
    for handle in handles:
        status = engines.wait(handle.job_id, timeout=5)
        assert (status.state, status.attempts) == ("succeeded", 1), status


def test_job_that_cannot_finish_is_requeued_and_completes_later(engines, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKER_SHUTDOWN_GRACE", "2")
    worker = engines.start_worker(queues="default")
    handle = engines.dispatch(
        "dramatiq", "test.stubborn", {"marker_dir": str(tmp_path), "seconds": 60}
    )
    wait_for(lambda: _lines(tmp_path / "block") == 1, timeout=20)
    stopped_at = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(15)
    assert time.monotonic() - stopped_at < 8, "the grace period must bound the shutdown"
    assert engines.live_workers("default") == 0, "a stopped worker deregisters at once"
    assert "requeueing unfinished message" in worker.output()

    engines.start_worker(queues="default")
    status = engines.wait(handle.job_id, timeout=30)
    assert status.state == "succeeded", status
    assert status.result == 2
    assert status.attempts == 2


def _health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobyard.cli", "health", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip


def test_health_reports_live_dead_redis_and_stuck_worker(engines, redis_server):
    assert _health().returncode == 1, "no worker yet"
    worker = engines.start_worker()
    ok = _health()
    assert ok.returncode == 0 and "healthy" in ok.stdout

    worker.signal_group(signal.SIGSTOP)  # a wedged process stops beating
    try:
        wait_for(lambda: _health().returncode != 0, timeout=15, interval=0.5)
    finally:
        worker.signal_group(signal.SIGCONT)
    wait_for(lambda: _health().returncode == 0, timeout=15, interval=0.5)

    redis_server.kill()
    dead = _health()
    assert dead.returncode == 1 and "Redis unreachable" in dead.stdout

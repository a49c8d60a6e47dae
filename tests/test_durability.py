"""A worker SIGKILLed after a job's first step: after recovery the first step does not run again."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from jobyard.dispatcher import get_job
from tests.support import wait_for


def _count(directory: Path, name: str) -> int:
    path = directory / name
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_killed_worker_resumes_after_finished_steps(engines, engine, tmp_path):
    handle = engines.dispatch(engine, "test.two_steps", {"marker_dir": str(tmp_path), "sleep": 3})
    # Killed once the first step has returned and is recorded: the job is in its durable sleep
    # (a kill between the step's side effect and its record may run it again, on either engine).
    wait_for(lambda: get_job(handle.job_id).run_at is not None, timeout=30)
    assert _count(tmp_path, "first") == 1
    victim = engines.worker if engine == "dramatiq" else engines.temporal_worker
    victim.signal_group(signal.SIGKILL)
    victim.proc.wait()
    assert _count(tmp_path, "second") == 0

    if engine == "dramatiq":
        engines.start_worker()
    else:
        engines.start_temporal_worker()
    status = engines.wait(handle.job_id, timeout=60)

    assert status.state == "succeeded", status
    assert status.engine == engine
    assert _count(tmp_path, "first") == 1
    assert _count(tmp_path, "second") == 1
    assert status.result == {"first": 1, "second": 1}


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_sleep_frees_the_worker_and_resumes(engines, engine, tmp_path, monkeypatch):
    """While one job sleeps 3 s, a single-threaded worker runs another job."""
    monkeypatch.setenv("WORKER_CONCURRENCY_DEFAULT", "1")
    sleeper = engines.dispatch(engine, "test.two_steps", {"marker_dir": str(tmp_path), "sleep": 3})
    wait_for(lambda: _count(tmp_path, "first") == 1, timeout=30)
    quick = engines.run(engine, "system.echo", {"ping": 1}, timeout=2.5)
    assert quick.state == "succeeded"
    assert _count(tmp_path, "second") == 0  # still sleeping when the echo finished
    status = engines.wait(sleeper.job_id, timeout=30)
    assert status.state == "succeeded", status
    assert status.result == {"first": 1, "second": 1}

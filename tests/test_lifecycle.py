"""Job lifecycle on both engines: job log, progress, cancellation, dead letters and replay,
completion webhooks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobyard.dispatcher import (
    JobStillActiveError,
    cancel_job,
    dispatch_job,
    get_job,
    get_job_record,
    list_jobs,
    replay_job,
)
from jobyard.job_engine import RetryPolicy, signing
from jobyard.job_engine.db.joblog import writer
from tests.conftest import WEBHOOK_SECRET
from tests.peers import webhook_receiver
from tests.support import ROOT, wait_for

ENGINES = ["dramatiq", "temporal"]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _logged(job_id: str, state: str, timeout: float = 15):
    """The job log row once it shows `state` (rows are written in batches)."""

    def row():
        current = writer()
        if current is not None:
            current.flush()
        record = get_job_record(job_id)
        return record if record is not None and record.state == state else None

    return wait_for(row, timeout=timeout, interval=0.2)


@pytest.mark.parametrize("engine", ENGINES)
def test_job_log_records_the_whole_life(shared_engines, engine):
    handle = shared_engines.dispatch(engine, "system.echo", {"hello": engine})
    assert shared_engines.wait(handle.job_id).state == "succeeded"
    record = _logged(handle.job_id, "succeeded")
    assert (record.name, record.queue, record.engine) == ("system.echo", "default", engine)
    assert record.payload == {"hello": engine}
    assert record.result == {"hello": engine}
    assert record.attempts == 1
    assert record.enqueued_at <= record.started_at <= record.finished_at
    assert record.duration_ms is not None and record.duration_ms >= 0
    expected_reason = "flag_off" if engine == "temporal" else None
    assert record.fallback_reason == expected_reason
    assert handle.job_id in [r.job_id for r in list_jobs(name="system.echo", engine=engine)]


def test_job_log_survives_a_worker_killed_mid_job(engines, tmp_path):
    handle = engines.dispatch(
        "dramatiq", "test.stubborn", {"marker_dir": str(tmp_path), "seconds": 60}
    )
    wait_for(lambda: _lines(tmp_path / "block") == 1, timeout=20)
    engines.worker.signal_group(signal.SIGKILL)
    engines.worker.proc.wait()
    engines.start_worker()
    assert engines.wait(handle.job_id, timeout=40).state == "succeeded"
    record = _logged(handle.job_id, "succeeded")
    assert record.attempts == 2
    assert record.result == 2
    assert len([r for r in list_jobs(name="test.stubborn") if r.job_id == handle.job_id]) == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_progress_is_visible_while_running(shared_engines, engine, tmp_path):
    handle = shared_engines.dispatch(engine, "test.progress", {"marker_dir": str(tmp_path)})
    wait_for(lambda: get_job(handle.job_id).progress == {"done": 1, "of": 2}, timeout=30)
    assert get_job(handle.job_id).state == "running"
    (tmp_path / "go").touch()
    status = shared_engines.wait(handle.job_id)
    assert (status.state, status.result) == ("succeeded", "done")
    assert _logged(handle.job_id, "succeeded").progress == 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_cancel_a_queued_job_it_never_starts(shared_engines, engine, tmp_path):
    handle = shared_engines.dispatch(
        engine, "test.progress", {"marker_dir": str(tmp_path)}, delay=3
    )
    status = cancel_job(handle.job_id)
    final = shared_engines.wait(handle.job_id, timeout=20)
    assert final.state == "cancelled", (status, final)
    time.sleep(3.5)  # past the delay: the job must still not have run
    assert _lines(tmp_path / "first-half") == 0
    assert _logged(handle.job_id, "cancelled").state == "cancelled"


@pytest.mark.parametrize("engine", ENGINES)
def test_cancel_a_running_job_stops_at_the_next_step(shared_engines, engine, tmp_path):
    handle = shared_engines.dispatch(
        engine, "test.two_steps", {"marker_dir": str(tmp_path), "sleep": 4}
    )
    wait_for(lambda: _lines(tmp_path / "first") == 1, timeout=30)
    cancel_job(handle.job_id)
    final = shared_engines.wait(handle.job_id, timeout=30)
    assert final.state == "cancelled"
    time.sleep(1)
    assert _lines(tmp_path / "second") == 0, "the step after the cancel must not run"


@pytest.mark.parametrize("engine", ENGINES)
def test_dead_job_is_kept_and_replays(shared_engines, engine, tmp_path):
    handle = shared_engines.dispatch(engine, "test.fragile", {"marker_dir": str(tmp_path)})
    dead = shared_engines.wait(handle.job_id, timeout=30)
    assert (dead.state, dead.attempts) == ("dead", 2), dead
    record = _logged(handle.job_id, "dead")
    assert record.payload == {"marker_dir": str(tmp_path)}
    assert "downstream service is broken" in (record.error_message or "")
    assert handle.job_id in [r.job_id for r in list_jobs(state="dead")]

    (tmp_path / "fixed").touch()
    replayed = replay_job(handle.job_id)
    assert (replayed.job_id, replayed.engine) == (handle.job_id, engine)
    with pytest.raises(JobStillActiveError):
        replay_job(handle.job_id)  # queued or running now: a second replay would run it twice
    final = shared_engines.wait(handle.job_id, timeout=30)
    assert (final.state, final.result, final.attempts) == ("succeeded", "fixed", 1)
    assert _logged(handle.job_id, "succeeded").result == "fixed"
    if engine == "dramatiq":
        assert _lines(tmp_path / "prepare") == 1, "finished steps are not run again on replay"


def test_replay_keeps_the_webhook_and_retry_policy_of_the_dispatch(shared_engines, tmp_path):
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        handle = shared_engines.dispatch(
            "dramatiq", "test.fragile", {"marker_dir": str(tmp_path)},
            webhook_url=receiver.url, retry=RetryPolicy(attempts=3, backoff=0.1),
        )  # fmt: skip
        assert shared_engines.wait(handle.job_id, timeout=30).attempts == 3  # the job's own: 2
        replay_job(handle.job_id)
        again = shared_engines.wait(handle.job_id, timeout=30)
        assert (again.state, again.attempts) == ("dead", 3)
        (tmp_path / "fixed").touch()
        replay_job(handle.job_id)
        assert shared_engines.wait(handle.job_id, timeout=30).state == "succeeded"
        wait_for(
            lambda: any(r.json()["event"] == "succeeded" for r in receiver.requests), timeout=20
        )


def test_replay_of_a_succeeded_job_is_refused(shared_engines):
    handle = shared_engines.dispatch("dramatiq", "system.echo", {})
    shared_engines.wait(handle.job_id)
    with pytest.raises(JobStillActiveError):
        replay_job(handle.job_id)


@pytest.mark.parametrize("engine", ENGINES)
def test_completion_webhook_is_delivered_signed(shared_engines, engine):
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        if engine == "temporal":
            shared_engines.ensure_temporal_worker()
        shared_engines.ensure_worker()  # for temporal, the event goes through webhook.deliver
        previous = shared_engines.dispatch  # dispatch with webhook_url through the chosen engine
        handle = previous(engine, "system.echo", {"x": 1}, webhook_url=receiver.url)
        shared_engines.wait(handle.job_id)
        wait_for(lambda: receiver.requests, timeout=20)
    event = receiver.requests[0]
    assert event.signature_valid
    assert event.json()["event"] == "succeeded"
    assert event.json()["job_id"] == handle.job_id
    assert event.json()["result"] == {"x": 1}
    assert event.headers[signing.IDEMPOTENCY_HEADER] == f"{handle.job_id}:event:succeeded"


def test_bad_webhook_url_is_refused(jobyard_env):
    with pytest.raises(ValueError, match="webhook_url"):
        dispatch_job("system.echo", {}, webhook_url="ftp://nope")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobyard.cli", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_dead_letters_from_the_command_line(shared_engines, tmp_path):
    handle = shared_engines.dispatch("dramatiq", "test.fragile", {"marker_dir": str(tmp_path)})
    assert shared_engines.wait(handle.job_id, timeout=30).state == "dead"
    _logged(handle.job_id, "dead")

    listed = [json.loads(line) for line in _cli("dead", "list").stdout.splitlines()]
    assert handle.job_id in [row["job_id"] for row in listed]
    shown = json.loads(_cli("dead", "show", handle.job_id).stdout)
    assert shown["payload"] == {"marker_dir": str(tmp_path)}
    assert "RuntimeError" in shown["error_traceback"]

    (tmp_path / "fixed").touch()
    replayed = _cli("dead", "replay", handle.job_id)
    assert replayed.returncode == 0, replayed.stderr
    assert shared_engines.wait(handle.job_id, timeout=30).state == "succeeded"
    again = _cli("dead", "replay", handle.job_id)
    assert again.returncode == 2 and "only dead, failed or cancelled jobs replay" in again.stderr


@pytest.mark.parametrize("engine", ENGINES)
def test_an_error_in_the_handler_itself_fails_the_job(shared_engines, engine, tmp_path):
    handle = shared_engines.dispatch(
        engine, "test.orchestration_bug", {"marker_dir": str(tmp_path)}
    )
    status = shared_engines.wait(handle.job_id, timeout=30)
    assert status.state in ("failed", "dead"), status
    assert "KeyError" in (status.error or "")
    assert _logged(handle.job_id, status.state).error_class == "KeyError"

"""Dispatch falls back to Temporal for each cause, promptly, and returns to Dramatiq by itself."""

from __future__ import annotations

import signal
import time

import pytest

from jobyard.dispatcher import dispatch_job, get_dispatcher, get_job
from tests.support import wait_for


def _wait_until_dramatiq(timeout: float = 10.0) -> None:
    """Dispatch returns to Dramatiq once the breaker's background probe sees Redis again."""
    wait_for(lambda: not get_dispatcher().breaker.is_open, timeout=timeout)


def test_flag_off_goes_to_temporal(engines, monkeypatch):
    engines.start_worker()
    engines.start_temporal_worker()
    monkeypatch.setenv("USE_DRAMATIQ", "false")
    handle = dispatch_job("system.echo", {"via": "flag"})
    assert (handle.engine, handle.fallback_reason) == ("temporal", "flag_off")
    status = engines.wait(handle.job_id)
    assert (status.engine, status.state, status.result) == (
        "temporal",
        "succeeded",
        {"via": "flag"},
    )
    monkeypatch.setenv("USE_DRAMATIQ", "true")
    assert dispatch_job("system.echo", {}).engine == "dramatiq"


def test_no_live_worker_goes_to_temporal(engines):
    engines.start_temporal_worker()
    handle = dispatch_job("system.echo", {"via": "no-worker"})
    assert (handle.engine, handle.fallback_reason) == ("temporal", "no_live_workers")
    assert engines.wait(handle.job_id).state == "succeeded"


def test_clean_stop_deregisters_at_once(engines):
    engines.start_temporal_worker()
    worker = engines.start_worker()
    assert dispatch_job("system.echo", {}).engine == "dramatiq"
    worker.stop()
    handle = dispatch_job("system.echo", {"after": "stop"})
    assert handle.fallback_reason == "no_live_workers"
    assert engines.wait(handle.job_id).state == "succeeded"


def test_dead_worker_counted_dead_after_heartbeat_timeout(engines):
    engines.start_temporal_worker()
    worker = engines.start_worker()
    worker.signal_group(signal.SIGKILL)
    worker.proc.wait()
    killed_at = time.monotonic()
    wait_for(lambda: dispatch_job("system.echo", {}).engine == "temporal", timeout=10, interval=0.2)
    # WORKER_HEARTBEAT_TIMEOUT is 3 s in tests; the worker must not be declared dead much sooner.
    assert time.monotonic() - killed_at > 2.0


def test_busy_queue_with_live_workers_stays_on_dramatiq(engines, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKER_CONCURRENCY_DEFAULT", "1")
    engines.start_worker(queues="default")
    blocker = dispatch_job("test.slow", {"seconds": 3})
    backlog = [dispatch_job("system.echo", {"n": i}) for i in range(50)]
    assert {h.engine for h in [blocker, *backlog]} == {"dramatiq"}
    for handle in backlog[-3:]:
        assert engines.wait(handle.job_id, timeout=30).state == "succeeded"


def test_redis_refusing_connections(engines, redis_server):
    engines.start_temporal_worker()
    engines.start_worker()
    assert dispatch_job("system.echo", {}).engine == "dramatiq"
    redis_server.kill()  # connections are refused from now on

    handle = dispatch_job("system.echo", {"n": 0})
    assert (handle.engine, handle.fallback_reason) == ("temporal", "redis_error")
    # Later callers skip Redis while the breaker is open: none waits on it (bench_paused_redis
    # measures how long dispatch takes through an outage).
    later = [dispatch_job("system.echo", {"n": i}) for i in range(1, 21)]
    assert {(h.engine, h.fallback_reason) for h in later} == {("temporal", "redis_unhealthy")}
    for h in [handle, *later[-2:]]:
        assert engines.wait(h.job_id).state == "succeeded"

    redis_server.start()  # same port, empty data: the worker registers again
    engines.wait_for_workers(["default"], engines.worker)
    _wait_until_dramatiq()
    handle = dispatch_job("system.echo", {"back": True})
    assert handle.engine == "dramatiq"
    assert engines.wait(handle.job_id).state == "succeeded"


def test_redis_paused(engines, redis_server):
    engines.start_temporal_worker()
    engines.start_worker()
    assert dispatch_job("system.echo", {}).engine == "dramatiq"
    redis_server.pause()
    try:
        first_handle = dispatch_job("system.echo", {"n": 0})
        later = [dispatch_job("system.echo", {"n": i}) for i in range(1, 31)]
        # Jobs that never touched Redis complete on Temporal while Redis is still paused.
        for h in later[-3:]:
            assert engines.wait(h.job_id).state == "succeeded"
    finally:
        redis_server.resume()

    assert (first_handle.engine, first_handle.fallback_reason) == ("temporal", "redis_error")
    # The first caller paid one Redis timeout; every later one skipped Redis (the breaker is
    # open), so none waited on it. How long each took is bench_paused_redis's to measure.
    assert {(h.engine, h.fallback_reason) for h in later} == {("temporal", "redis_unhealthy")}

    # The first enqueue may have landed in Redis when it resumed: exactly one engine runs it.
    status = engines.wait(first_handle.job_id)
    assert status.state == "succeeded"
    _wait_until_dramatiq()
    handle = dispatch_job("system.echo", {"back": True})
    assert handle.engine == "dramatiq"
    assert engines.wait(handle.job_id).state == "succeeded"


@pytest.mark.parametrize("down", ["refused"])
def test_both_engines_down_is_a_clear_error(jobyard_env, redis_server, monkeypatch, down):
    from jobyard.dispatcher import DispatchUnavailableError, reset_dispatcher
    from tests.support import free_port

    monkeypatch.setenv("TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("TEMPORAL_START_TIMEOUT", "0.5")
    reset_dispatcher()
    redis_server.kill()
    with pytest.raises(DispatchUnavailableError, match="Retry the dispatch with the same job_id"):
        dispatch_job("system.echo", {})


def test_queued_jobs_move_to_temporal_when_their_workers_die(engines, monkeypatch, tmp_path):
    """Jobs waiting on Dramatiq run on Temporal once no worker is left, a started one too."""
    monkeypatch.setenv("WORKER_CONCURRENCY_DEFAULT", "1")
    monkeypatch.setenv("JOBYARD_RESCUE_INTERVAL", "0.5")
    worker = engines.start_worker(queues="default")
    blocker_dir = tmp_path / "blocker"
    blocker_dir.mkdir()
    blocker = dispatch_job("test.stubborn", {"seconds": 60, "marker_dir": str(blocker_dir)})
    wait_for(lambda: (blocker_dir / "block").exists(), timeout=20)
    waiting = []
    for i in range(5):
        directory = tmp_path / f"job{i}"
        directory.mkdir()
        handle = dispatch_job("test.slow", {"seconds": 0, "marker_dir": str(directory)})
        waiting.append((directory, handle))
    assert {h.engine for _, h in waiting} == {"dramatiq"}
    worker.signal_group(signal.SIGKILL)
    worker.proc.wait()

    # Temporal runs the default queue's concurrency of steps at once: not only the blocker's.
    monkeypatch.setenv("WORKER_CONCURRENCY_DEFAULT", "4")
    engines.start_temporal_worker()
    for directory, handle in waiting:
        status = engines.wait(handle.job_id, timeout=40)
        assert (status.state, status.engine) == ("succeeded", "temporal"), status
        assert (directory / "started").read_text().count("ran") == 1
    # The blocker was killed mid-step: it moves too, and its interrupted step runs again there.
    finished = engines.wait(blocker.job_id, timeout=60)
    assert (finished.state, finished.engine, finished.result) == ("succeeded", "temporal", 2)


def test_delayed_and_parked_jobs_move_with_their_finished_steps(engines, monkeypatch, tmp_path):
    """A job dispatched with a delay and one parked in ctx.sleep after a step both move to
    Temporal when their workers die; the parked one does not run its finished step again."""
    monkeypatch.setenv("JOBYARD_RESCUE_INTERVAL", "0.5")
    worker = engines.start_worker(queues="default")
    delayed = dispatch_job("system.echo", {"late": True}, delay=3)
    parked_dir = tmp_path / "parked"
    parked_dir.mkdir()
    parked = dispatch_job("test.two_steps", {"marker_dir": str(parked_dir), "sleep": 4})
    # Parked: its first step recorded and its resume waiting on the delay queue (the marker
    # file alone is written before the step's result is recorded).
    wait_for(lambda: get_job(parked.job_id).run_at is not None, timeout=30)
    worker.signal_group(signal.SIGKILL)
    worker.proc.wait()
    engines.start_temporal_worker()
    for handle in (delayed, parked):
        status = engines.wait(handle.job_id, timeout=60)
        assert (status.state, status.engine) == ("succeeded", "temporal"), status
    assert (parked_dir / "first").read_text().count("ran") == 1
    assert (parked_dir / "second").read_text().count("ran") == 1


def test_jobs_redis_lost_are_dispatched_again_from_the_job_log(engines, redis_server, tmp_path):
    """Redis restarts empty under parked jobs: the job log still knows them, so the rescue
    dispatches them again under their ids and they finish, and the step that had returned
    does not run again (its result was kept in the database as it returned). A job that had
    finished is still answered by get_job, from the job log."""
    engines.start_worker()
    engines.start_temporal_worker()
    done = dispatch_job("system.echo", {"before": "the wipe"})
    assert engines.wait(done.job_id, timeout=30).state == "succeeded"
    handles, dirs = [], []
    for n in range(3):
        directory = tmp_path / f"job{n}"
        directory.mkdir()
        dirs.append(directory)
        handles.append(dispatch_job("test.two_steps", {"marker_dir": str(directory), "sleep": 8}))
    wait_for(lambda: all((d / "first").exists() for d in dirs), timeout=60)
    time.sleep(1.5)  # the job log's shipper has written them as running
    redis_server.kill()
    redis_server.start()  # no persistence: it comes back empty
    for handle, directory in zip(handles, dirs, strict=True):
        status = engines.wait(handle.job_id, timeout=90)
        assert status.state == "succeeded", status
        assert (directory / "first").read_text().count("ran") == 1
        assert (directory / "second").read_text().count("ran") == 1
    remembered = get_job(done.job_id)
    assert (remembered.state, remembered.result) == ("succeeded", {"before": "the wipe"})

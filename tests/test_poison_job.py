"""A job whose step kills its worker process (os._exit) is bounded by its retry policy, and the
jobs that ran beside it are not killed with it again and again (jobyard.queue.reclaim)."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import tests.poison_jobs  # noqa: F401  # registers the jobs in this (the dispatching) process
from jobyard.dispatcher import dispatch_job, get_job
from jobyard.queue import keys
from tests.support import wait_for

TERMINAL = ("succeeded", "failed", "dead", "cancelled")
ATTEMPTS = 3  # tests.poison_jobs.poison's RetryPolicy
NEIGHBOURS = 24


def _runs(directory: Path, name: str) -> int:
    path = directory / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def _final(job_id: str) -> bool:
    return get_job(job_id).state in TERMINAL


def test_a_job_that_kills_its_process_ends_dead_and_spares_its_neighbours(
    engines, tmp_path, monkeypatch
):
    monkeypatch.setenv("JOBYARD_JOB_MODULES", "tests.jobs,tests.poison_jobs")
    heartbeat_timeout = 3.0  # tests/conftest.py's WORKER_HEARTBEAT_TIMEOUT
    engines.start_worker(queues="default", processes=2)

    def neighbour(i: int) -> str:
        payload = {"marker_dir": str(tmp_path), "name": f"n{i}", "seconds": 1.0}
        return dispatch_job("test.neighbour", payload).job_id

    # A few neighbours first, so that some are running beside the poison when it first kills
    # its process; more after it, fetched by the processes that run it again.
    before = [neighbour(i) for i in range(3)]
    dispatched_at = time.monotonic()
    poison = dispatch_job("test.poison", {"marker_dir": str(tmp_path)}).job_id
    after = [neighbour(i) for i in range(3, NEIGHBOURS)]

    bound = ATTEMPTS * heartbeat_timeout + 10
    wait_for(lambda: _final(poison), timeout=bound)
    dead_after = time.monotonic() - dispatched_at
    status = get_job(poison)
    assert status.state == "dead", status
    assert status.error.startswith("WorkerProcessDied: "), status
    assert "exit code 1" in status.error and socket.gethostname() in status.error, status.error
    poison_runs = _runs(tmp_path, "poison")
    assert 1 <= poison_runs <= ATTEMPTS, poison_runs

    for job_id in before + after:
        wait_for(lambda job_id=job_id: _final(job_id), timeout=60)
    states = {job_id: get_job(job_id).state for job_id in before + after}
    assert set(states.values()) == {"succeeded"}, states
    runs = {f"n{i}": _runs(tmp_path, f"n{i}") for i in range(NEIGHBOURS)}
    assert all(1 <= n <= 2 for n in runs.values()), runs  # cut at most once
    time.sleep(2 * heartbeat_timeout)  # a late redelivery would run the poison again
    assert _runs(tmp_path, "poison") == poison_runs
    print(status.error)
    print(
        f"poison ran {poison_runs}x, dead {dead_after:.1f} s after dispatch (bound {bound:g} s);"
        f" neighbours cut: {sum(1 for n in runs.values() if n == 2)} of {NEIGHBOURS}"
    )


def test_a_host_that_dies_whole_leaves_its_running_jobs_to_run_alone(engines, tmp_path):
    """The supervisor dies with its process (the whole host, say): no one sees the exit, and the
    running job's message is taken back by the sweep that finds the heartbeat old, as a suspect
    (run alone, its death recorded)."""
    engines.start_worker(queues="default")
    handle = dispatch_job("test.stubborn", {"marker_dir": str(tmp_path), "seconds": 60})
    wait_for(lambda: _runs(tmp_path, "block") == 1, timeout=30)
    engines.worker.signal_group(signal.SIGKILL)
    engines.worker.proc.wait()

    engines.start_worker(queues="default")
    wait_for(lambda: _final(handle.job_id), timeout=60)
    status = get_job(handle.job_id)
    assert status.state == "succeeded", status
    assert status.result == 2  # block_first_time's count: it ran twice
    record = engines.redis.client().hgetall(keys.job(handle.job_id))
    assert b"stopped sending heartbeats" in record[b"died"], record
    assert record[b"lone"] == record[b"seq"]  # its second run was a suspect's, alone


def test_on_temporal_a_job_that_kills_its_worker_is_bounded_and_the_worker_comes_back(
    engines, tmp_path, monkeypatch
):
    """The poison on Temporal kills the whole `jobyard temporal-worker` process under it; the
    command's supervisor starts it again, Temporal retries the step once its heartbeats stop
    (each death an attempt), and the job ends with its retry policy while its neighbours,
    dispatched after it, still run."""
    monkeypatch.setenv("JOBYARD_JOB_MODULES", "tests.jobs,tests.poison_jobs")
    monkeypatch.setenv("USE_DRAMATIQ", "false")
    temporal_worker = engines.start_temporal_worker()
    poison = dispatch_job("test.poison", {"marker_dir": str(tmp_path)}).job_id
    wait_for(lambda: _runs(tmp_path, "poison") >= 1, timeout=30)
    neighbours = [
        dispatch_job(
            "test.neighbour", {"marker_dir": str(tmp_path), "name": f"n{i}", "seconds": 0.1}
        ).job_id
        for i in range(3)
    ]
    step_heartbeat_timeout = 6.0  # temporal_worker/activities.py STEP_HEARTBEAT_TIMEOUT
    wait_for(lambda: _final(poison), timeout=ATTEMPTS * (step_heartbeat_timeout + 5) + 30)
    status = get_job(poison)
    assert status.state == "dead", status
    assert status.error.startswith("WorkerProcessDied: "), status.error
    assert socket.gethostname() in status.error, status.error
    assert _runs(tmp_path, "poison") == ATTEMPTS
    for job_id in neighbours:
        wait_for(lambda job_id=job_id: _final(job_id), timeout=60)
        assert get_job(job_id).state == "succeeded"
    assert temporal_worker.proc.poll() is None  # the supervisor outlived every death
    assert temporal_worker.output().count("restarting in") >= ATTEMPTS
    print(status.state, status.error)

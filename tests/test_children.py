"""Children on the real engines, beyond the ctx conformance suite (tests/test_ctx_conformance.py,
which runs the same handlers on every engine): a waiting parent holds no worker thread, children
run on Temporal alone, and a parent moved from Dramatiq to Temporal in the middle of its wait
resumes once there."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from jobyard.dispatcher import cancel_job, get_job, replay_job
from tests.support import wait_for

MODULES = "tests.jobs,tests.conformance_jobs,tests.children_jobs"


def runs(directory: Path) -> dict[str, int]:
    """Executions per step; `go` and `fixed` are the tests' signals, not steps."""
    signals = ("go", "fixed")
    return {
        p.name: len(p.read_text().splitlines())
        for p in directory.iterdir()
        if p.name not in signals
    }


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_a_waiting_parent_holds_no_worker(engines, engine, tmp_path, monkeypatch):
    """One worker thread (Dramatiq) or one step slot (Temporal) for the queue: the parent's
    children can only run if the waiting parent does not hold it. On Temporal alone (no
    Dramatiq worker), the children go to Temporal too."""
    monkeypatch.setenv("JOBYARD_JOB_MODULES", MODULES)
    monkeypatch.setenv("WORKER_CONCURRENCY_DEFAULT", "1")
    handle = engines.dispatch(
        engine, "conformance.fan_out", {"marker_dir": str(tmp_path), "count": 3}
    )
    status = engines.wait(handle.job_id, timeout=60)
    assert status.state == "succeeded", status
    assert status.result["results"] == [0, 10, 20]
    assert runs(tmp_path) == {
        "before": 1, "child-0": 1, "child-1": 1, "child-2": 1, "resumed": 1, "child-100": 1,
        "after": 2,
    }  # fmt: skip
    for index in range(3):
        child = get_job(f"{handle.job_id}:child1-{index}")
        assert (child.state, child.engine, child.result) == ("succeeded", engine, index * 10)


def test_a_parent_moved_to_temporal_mid_wait_resumes_once(engines, tmp_path, monkeypatch):
    """The parent parks on Dramatiq while its child runs; the Dramatiq worker dies; the rescue
    moves both to Temporal, where the child ends and the parent resumes, once."""
    monkeypatch.setenv("JOBYARD_JOB_MODULES", MODULES)
    monkeypatch.setenv("JOBYARD_RESCUE_INTERVAL", "0.5")
    worker = engines.start_worker(queues="default")
    handle = engines.dispatch("dramatiq", "children.gated_parent", {"marker_dir": str(tmp_path)})
    wait_for(lambda: (tmp_path / "waiting").exists(), timeout=30)  # the child runs its step
    assert runs(tmp_path) == {"before": 1, "waiting": 1}
    wait_for(lambda: get_job(handle.job_id).display_state == "waiting for 1 child", timeout=30)
    assert get_job(handle.job_id).waiting_reason == f"children {handle.job_id}:child:gate"
    worker.signal_group(signal.SIGKILL)
    worker.proc.wait()

    engines.start_temporal_worker()
    (tmp_path / "go").touch()
    status = engines.wait(handle.job_id, timeout=90)
    assert (status.state, status.engine) == ("succeeded", "temporal"), status
    assert status.result == {"opened": True, "after": 1}
    child = get_job(f"{handle.job_id}:child:gate")
    assert (child.state, child.engine) == ("succeeded", "temporal")
    counted = runs(tmp_path)
    # The child was killed mid-step: its step runs again on Temporal (at least once).
    assert counted == {"before": 1, "waiting": 2, "after": 1}, counted


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_cancelling_a_waiting_parent_cancels_its_unfinished_children(
    engines, engine, tmp_path, monkeypatch
):
    monkeypatch.setenv("JOBYARD_JOB_MODULES", MODULES)
    engines.start_worker()  # the child runs on Dramatiq, the parent on `engine`
    handle = engines.dispatch(engine, "children.gated_parent", {"marker_dir": str(tmp_path)})
    wait_for(lambda: get_job(handle.job_id).display_state == "waiting for 1 child", timeout=30)
    child_id = f"{handle.job_id}:child:gate"
    wait_for(lambda: get_job(child_id).state == "running", timeout=30)
    assert cancel_job(handle.job_id).job_id == handle.job_id
    assert engines.wait(handle.job_id, timeout=30).state == "cancelled"
    (tmp_path / "go").touch()  # the child's running step returns; its job stops there
    assert engines.wait(child_id, timeout=30).state == "cancelled"
    assert runs(tmp_path) == {"before": 1, "waiting": 1}  # no `after`


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_a_replayed_parent_reuses_its_childrens_results(engines, engine, tmp_path, monkeypatch):
    """Dramatiq keeps the recorded fan-in; Temporal's new run dispatches the same ids again
    (deduped) and reads the same endings: either way no child runs twice."""
    monkeypatch.setenv("JOBYARD_JOB_MODULES", MODULES)
    engines.start_worker()
    handle = engines.dispatch(engine, "children.replayable", {"marker_dir": str(tmp_path)})
    assert engines.wait(handle.job_id, timeout=60).state == "failed"
    (tmp_path / "fixed").touch()
    replay_job(handle.job_id)
    status = engines.wait(handle.job_id, timeout=60)
    assert (status.state, status.result) == ("succeeded", {"results": [10, 20], "finish": "fixed"})
    assert runs(tmp_path) == {"child-1": 1, "child-2": 1, "finish": 2}


def test_a_fan_out_survives_its_worker_killed_and_resumes_once(engines, tmp_path, monkeypatch):
    """100 children, the Dramatiq worker SIGKILLed when about a third have run, started again:
    every child ends, the parent goes past the fan-in once with all 100 results in order (a
    child killed mid-step may run its step again: at least once)."""
    monkeypatch.setenv("JOBYARD_JOB_MODULES", MODULES)
    worker = engines.start_worker()
    payload = {"marker_dir": str(tmp_path), "count": 100, "seconds": 0.05}
    handle = engines.dispatch("dramatiq", "conformance.fan_out", payload)
    wait_for(lambda: sum(p.name.startswith("child-") for p in tmp_path.iterdir()) >= 30, 60)
    worker.signal_group(signal.SIGKILL)
    worker.proc.wait()
    engines.start_worker()
    status = engines.wait(handle.job_id, timeout=120)
    assert status.state == "succeeded", status
    assert status.result["results"] == [n * 10 for n in range(100)]
    counted = runs(tmp_path)
    assert (counted["before"], counted["resumed"], counted["child-100"]) == (1, 1, 1), counted
    assert all(counted[f"child-{n}"] >= 1 for n in range(100)), counted

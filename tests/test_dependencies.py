"""`dispatch_job(..., after=[job_id, ...])` on the real engines: the job waits (parked) until
every listed job ended, then runs with their results (`ctx.upstream()`); a failed one cancels it
with a reason naming that job, unless `after_failure="run"`; an unknown id is refused at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobyard.dispatcher import (
    DispatchRequest,
    UnknownUpstreamError,
    dispatch_job,
    dispatch_many,
    get_job,
)
from tests.support import wait_for

MODULES = "tests.jobs,tests.conformance_jobs,tests.children_jobs"
ENGINES = ["dramatiq", "temporal"]


@pytest.fixture
def both(engines, monkeypatch):
    """A Dramatiq and a Temporal worker, the upstream jobs on Dramatiq."""
    monkeypatch.setenv("JOBYARD_JOB_MODULES", MODULES)
    engines.start_worker()
    engines.start_temporal_worker()
    return engines


def marker_dir(tmp_path: Path, name: str) -> str:
    directory = tmp_path / name
    directory.mkdir()
    return str(directory)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_job_runs_after_its_upstream_with_their_results(both, engine, tmp_path):
    gate = marker_dir(tmp_path, "gate")
    gated = dispatch_job("children.gated", {"marker_dir": gate})
    quick = dispatch_job("conformance.child", {"marker_dir": gate, "n": 5})
    reports = marker_dir(tmp_path, "report")
    handle = both.dispatch(
        engine, "children.report", {"marker_dir": reports}, after=[gated.job_id, quick.job_id]
    )
    assert both.wait(quick.job_id).state == "succeeded"
    wait_for(lambda: (Path(gate) / "waiting").exists(), timeout=30)
    wait_for(lambda: get_job(handle.job_id).display_state == "waiting for 2 jobs", timeout=30)
    assert get_job(handle.job_id).state == "running"  # parked before its handler
    assert not (Path(reports) / "report").exists()
    (Path(gate) / "go").touch()
    status = both.wait(handle.job_id, timeout=60)
    assert (status.state, status.engine) == ("succeeded", engine), status
    assert status.result == {gated.job_id: True, quick.job_id: 50}
    assert (Path(reports) / "report").read_text().count("ran") == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failed_upstream_cancels_the_job_naming_it(both, engine, tmp_path):
    directory = marker_dir(tmp_path, "up")
    failing = dispatch_job("conformance.child", {"marker_dir": directory, "n": 1, "fail": True})
    fine = dispatch_job("conformance.child", {"marker_dir": directory, "n": 2})
    reports = marker_dir(tmp_path, "report")
    after = [fine.job_id, failing.job_id]
    cancelled = both.dispatch(engine, "children.report", {"marker_dir": reports}, after=after)
    ran = both.dispatch(
        engine, "children.report", {"marker_dir": reports}, after=after, after_failure="run"
    )
    status = both.wait(cancelled.job_id, timeout=60)
    assert status.state == "cancelled", status
    assert f"upstream job {failing.job_id} ended failed" in (status.error or ""), status
    status = both.wait(ran.job_id, timeout=60)
    assert status.state == "succeeded", status
    assert status.result == {fine.job_id: 20, failing.job_id: "failed"}
    assert (Path(reports) / "report").read_text().count("ran") == 1  # the cancelled one: never


def test_an_unknown_upstream_is_refused_at_dispatch(both, tmp_path):
    directory = marker_dir(tmp_path, "report")
    with pytest.raises(UnknownUpstreamError, match="no job with id 'no-such-job'"):
        dispatch_job("children.report", {"marker_dir": directory}, after=["no-such-job"])
    known = dispatch_job("conformance.child", {"marker_dir": directory, "n": 3})
    results = dispatch_many([
        DispatchRequest("children.report", {"marker_dir": directory}, after=["no-such-job"]),
        DispatchRequest("children.report", {"marker_dir": directory}, after=[known.job_id]),
    ])  # fmt: skip
    assert isinstance(results[0], UnknownUpstreamError)
    status = both.wait(results[1].job_id, timeout=60)
    assert (status.state, status.result) == ("succeeded", {known.job_id: 30})
    with pytest.raises(ValueError, match="after_failure"):
        dispatch_job("children.report", {"marker_dir": directory}, after=[known.job_id],
                     after_failure="maybe")  # fmt: skip


def test_a_job_redis_lost_still_waits_for_its_upstream(
    engines, redis_server, monkeypatch, tmp_path
):
    """Redis restarts empty while a job waits for a delayed upstream job: the rescue dispatches
    both again from the job log, and the dependent one still waits (its `after` is kept in the
    step journal), then runs once with the upstream's result."""
    from jobyard.job_engine.db import joblog

    monkeypatch.setenv("JOBYARD_JOB_MODULES", MODULES)
    engines.start_worker()
    upstream_dir, reports = marker_dir(tmp_path, "upstream"), marker_dir(tmp_path, "report")
    upstream = dispatch_job("conformance.child", {"marker_dir": upstream_dir, "n": 7}, delay=20)
    handle = dispatch_job("children.report", {"marker_dir": reports}, after=[upstream.job_id])
    wait_for(lambda: get_job(handle.job_id).display_state == "waiting for 1 job", timeout=30)
    writer = joblog.writer()
    assert writer is not None
    writer.flush()
    redis_server.kill()
    redis_server.start()  # no persistence: both jobs are gone from Redis; the worker reconnects
    engines.start_temporal_worker()  # runs the rescue
    status = engines.wait(handle.job_id, timeout=120)
    assert status.state == "succeeded", status
    assert status.result == {upstream.job_id: 70}  # it waited: the upstream's result is there
    assert (Path(upstream_dir) / "child-7").read_text().count("ran") == 1
    assert (Path(reports) / "report").read_text().count("ran") == 1

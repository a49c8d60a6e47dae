"""States people can read: a job parked in ctx.sleep shows as sleeping until its wake time, a
delayed job as delayed until it may start, a retrying job with its next attempt; on both
engines, in the job's detail, the listing and its event stream."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.api.conftest import ApiServer, on_engine
from tests.api.test_events import read_stream
from tests.api.test_lifecycle import dispatch
from tests.engines import Engines

ENGINES = ["dramatiq", "temporal"]


def seconds_until(iso: str) -> float:
    return (datetime.fromisoformat(iso) - datetime.now(UTC)).total_seconds()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_parked_job_is_sleeping_until_its_wake_time(
    shared_api: ApiServer,
    shared_engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    engine: str,
) -> None:
    on_engine(shared_engines, monkeypatch, engine)
    job_id = dispatch(shared_api, "api.nap", {"marker_dir": str(tmp_path), "nap": 12})

    asleep = shared_api.wait_for(
        job_id, lambda j: j["display_state"] == "sleeping", engines=shared_engines
    )
    assert asleep["state"] == "running"  # the shared_engines' state is unchanged
    assert 0 < seconds_until(asleep["run_at"]) <= 12.5, asleep["run_at"]
    listed = {j["job_id"]: j for j in shared_api.client.get("/jobs").json()}
    # the listing reads the job log, written in batches
    deadline = time.monotonic() + 10
    while listed.get(job_id, {}).get("display_state") != "sleeping":  # or not listed yet
        assert time.monotonic() < deadline, listed.get(job_id)
        time.sleep(0.2)
        listed = {j["job_id"]: j for j in shared_api.client.get("/jobs").json()}
    assert listed[job_id]["run_at"] == asleep["run_at"][:19] + listed[job_id]["run_at"][19:]

    events = read_stream(shared_api, job_id)
    sleeping = [e for e in events if e["kind"] == "state" and e.get("run_at")]
    assert len(sleeping) == 1 and sleeping[0]["state"] == "running", events
    assert events[-1]["state"] == "succeeded"
    done = shared_api.job(job_id)
    assert (done["display_state"], done["run_at"]) == ("succeeded", None)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_delayed_job_shows_when_it_may_start(
    shared_api: ApiServer,
    shared_engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    engine: str,
) -> None:
    on_engine(shared_engines, monkeypatch, engine)
    payload = {"marker_dir": str(tmp_path), "steps": 1, "seconds": 0}
    job_id = dispatch(shared_api, "api.steps", payload, delay=60)

    delayed = shared_api.wait_for(
        job_id, lambda j: j["display_state"] == "delayed", engines=shared_engines
    )
    assert delayed["state"] == "queued"
    assert 50 < seconds_until(delayed["run_at"]) <= 60
    shared_api.client.delete(f"/jobs/{job_id}", headers=shared_api.admin(admin_token))
    cancelled = shared_api.wait_for(
        job_id, lambda j: j["state"] == "cancelled", engines=shared_engines
    )
    assert cancelled["display_state"] == "cancelled"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_retrying_job_shows_its_next_attempt(
    shared_api: ApiServer,
    shared_engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    engine: str,
) -> None:
    on_engine(shared_engines, monkeypatch, engine)
    job_id = dispatch(shared_api, "api.retry_later", {"marker_dir": str(tmp_path)})

    retrying = shared_api.wait_for(
        job_id, lambda j: j["state"] == "retrying" and j.get("run_at"), engines=shared_engines
    )
    assert retrying["display_state"] == "retrying"
    assert 0 < seconds_until(retrying["run_at"]) <= 6.5, retrying["run_at"]
    shared_api.wait_for(job_id, lambda j: j["state"] == "dead", engines=shared_engines)

"""A job's whole life through the HTTP API, on both engines: dispatch, watch state and progress,
read the job log, cancel (queued and running), die, replay. Marker files written by the job's
steps say what really ran."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import ApiServer, on_engine
from tests.api.jobs_api import ALLOW_FILE
from tests.engines import Engines

ENGINES = ["dramatiq", "temporal"]


def dispatch(api: ApiServer, name: str, payload: dict[str, Any], **params: Any) -> str:
    job_id = f"{name.replace('.', '-')}-{uuid.uuid4().hex[:10]}"
    response = api.client.post(f"/jobs/{name}", json=payload, params={"job_id": job_id, **params})
    assert response.status_code == 202, response.text
    return job_id


def runs(marker_dir: Path, step: str) -> int:
    path = marker_dir / step
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("engine", ENGINES)
def test_state_and_progress_move_and_the_job_log_fills_in(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    engine: str,
) -> None:
    on_engine(engines, monkeypatch, engine)
    payload = {"marker_dir": str(tmp_path), "steps": 3, "seconds": 0.8}
    job_id = dispatch(api, "api.steps", payload)

    seen_states: list[str] = []
    seen_progress: list[Any] = []

    def observe(job: dict[str, Any]) -> bool:
        if not seen_states or seen_states[-1] != job["state"]:
            seen_states.append(job["state"])
        if job["state"] == "running" and job.get("progress") is not None:
            seen_progress.append(job["progress"])
        return job["state"] == "succeeded" and job.get("finished_at") is not None

    done = api.wait_for(job_id, observe, engines=engines)

    assert "running" in seen_states, seen_states
    assert any(0 < p < 1 for p in seen_progress), seen_progress  # mid-run progress was visible
    assert done["engine"] == engine
    assert done["result"] == {"steps": 3}
    assert done["payload"] == payload
    assert done["name"] == "api.steps"
    assert done["queue"] == "default"
    assert done["enqueued_at"] <= done["started_at"] <= done["finished_at"]
    assert done["duration_ms"] is not None and done["duration_ms"] >= 2000
    assert "job_log_error" not in done
    if engine == "dramatiq":  # Temporal keeps step results in its own history
        assert set(done["steps"]) == {"step-0", "step-1", "step-2"}

    listed = api.client.get("/jobs", params={"name": "api.steps", "engine": engine}).json()
    assert [j["job_id"] for j in listed] == [job_id]
    other_engine = "temporal" if engine == "dramatiq" else "dramatiq"
    assert api.client.get("/jobs", params={"engine": other_engine}).json() == []
    assert api.client.get("/jobs", params={"state": "succeeded"}).json()[0]["job_id"] == job_id


@pytest.mark.parametrize("engine", ENGINES)
def test_cancel_a_queued_job_so_it_never_runs(
    shared_api: ApiServer,
    shared_engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    engine: str,
) -> None:
    on_engine(shared_engines, monkeypatch, engine)
    job_id = dispatch(
        shared_api, "api.steps", {"marker_dir": str(tmp_path), "steps": 1, "seconds": 0}, delay=3
    )
    assert shared_api.job(job_id)["state"] == "queued"

    response = shared_api.client.delete(f"/jobs/{job_id}", headers=shared_api.admin(admin_token))

    assert response.status_code == 200, response.text
    assert response.json()["job_id"] == job_id
    shared_api.wait_for(job_id, lambda j: j["state"] == "cancelled", engines=shared_engines)
    time.sleep(4)  # past the delay: a job that was not really cancelled would run now
    assert runs(tmp_path, "step-0") == 0
    assert shared_api.job(job_id)["state"] == "cancelled"
    cancelled = shared_api.client.get("/jobs", params={"state": "cancelled"}).json()
    assert job_id in [j["job_id"] for j in cancelled]


@pytest.mark.parametrize("engine", ENGINES)
def test_cancel_a_running_job_stops_it_between_steps(
    shared_api: ApiServer,
    shared_engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    engine: str,
) -> None:
    on_engine(shared_engines, monkeypatch, engine)
    job_id = dispatch(
        shared_api, "api.steps", {"marker_dir": str(tmp_path), "steps": 4, "seconds": 1.5}
    )
    deadline = time.monotonic() + 30
    while runs(tmp_path, "step-0") == 0:
        assert time.monotonic() < deadline, shared_engines.logs()
        time.sleep(0.05)

    response = shared_api.client.delete(f"/jobs/{job_id}", headers=shared_api.admin(admin_token))

    assert response.status_code == 200, response.text
    shared_api.wait_for(job_id, lambda j: j["state"] == "cancelled", engines=shared_engines)
    time.sleep(3.5)  # long enough for two more steps, had the job kept going
    assert runs(tmp_path, "step-3") == 0
    assert runs(tmp_path, "step-2") == 0
    assert shared_api.job(job_id)["state"] == "cancelled"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_job_that_exhausts_its_retries_is_dead_and_replays(
    shared_api: ApiServer,
    shared_engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    engine: str,
) -> None:
    on_engine(shared_engines, monkeypatch, engine)
    job_id = dispatch(shared_api, "api.flaky", {"marker_dir": str(tmp_path)})

    def in_dead_letters() -> list[dict[str, Any]]:
        return [j for j in shared_api.client.get("/dead").json() if j["job_id"] == job_id]

    shared_api.wait_for(job_id, lambda j: j["state"] in ("dead", "failed"), engines=shared_engines)
    deadline = time.monotonic() + 10
    while not in_dead_letters():  # the job log is written in batches
        assert time.monotonic() < deadline, shared_api.job(job_id)
        time.sleep(0.2)
    (dead,) = in_dead_letters()
    assert dead["attempts"] == 2
    assert dead["error_class"] and "RuntimeError" in dead["error_class"]
    assert "not allowed yet" in dead["error_message"]
    detail = shared_api.job(job_id)
    assert "not allowed yet" in (detail.get("error") or detail["error_message"])
    assert runs(tmp_path, "check") == 2
    assert runs(tmp_path, "prepare") == 1

    (tmp_path / ALLOW_FILE).touch()
    replay = shared_api.client.post(f"/jobs/{job_id}/replay", headers=shared_api.admin(admin_token))

    assert replay.status_code == 202, replay.text
    assert replay.json()["job_id"] == job_id
    assert replay.json()["status_url"] == f"/jobs/{job_id}"
    done = shared_api.wait_for(job_id, lambda j: j["state"] == "succeeded", engines=shared_engines)
    # replay_job's contract: on Dramatiq finished steps keep their results; a Temporal replay
    # is a new workflow run, so its steps run again
    prepare_runs = 1 if engine == "dramatiq" else 2
    assert done["result"] == {"prepared": prepare_runs, "checked": "allowed"}
    assert runs(tmp_path, "check") == 3
    assert runs(tmp_path, "prepare") == prepare_runs
    deadline = time.monotonic() + 10
    while in_dead_letters():
        assert time.monotonic() < deadline, "a replayed job stays in the dead letters"
        time.sleep(0.2)


@pytest.mark.parametrize("engine", ENGINES)
def test_replaying_an_active_job_is_409(
    shared_api: ApiServer,
    shared_engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    engine: str,
) -> None:
    on_engine(shared_engines, monkeypatch, engine)
    job_id = dispatch(
        shared_api, "api.steps", {"marker_dir": str(tmp_path), "steps": 1, "seconds": 0}, delay=30
    )
    response = shared_api.client.post(
        f"/jobs/{job_id}/replay", headers=shared_api.admin(admin_token)
    )
    assert response.status_code == 409
    assert response.json()["state"] == "queued"
    shared_api.client.delete(f"/jobs/{job_id}", headers=shared_api.admin(admin_token))


def test_queues_and_workers_show_the_live_system(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
) -> None:
    on_engine(engines, monkeypatch, "dramatiq")
    headers = api.admin(admin_token)
    dispatch(api, "api.steps", {"marker_dir": str(tmp_path), "steps": 1, "seconds": 0}, delay=60)

    queues = {q["name"]: q for q in api.client.get("/queues", headers=headers).json()}
    assert queues["default"]["delayed"] == 1
    assert queues["default"]["live_workers"] >= 1
    workers = api.client.get("/workers", headers=headers).json()
    assert len(workers) == 1
    assert set(workers[0]["queues"]) == {"default", "data-sync", "scheduled"}
    assert workers[0]["last_seen"] > time.time() - 10

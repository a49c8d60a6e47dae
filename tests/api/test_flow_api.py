"""Flow control over HTTP: a payload without its limit's key is a 422 and starts nothing; a
job a limit holds says so in GET /jobs/{id} (`display_state`, `waiting_reason`), and GET /flow
lists the key holding it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jobyard.job_engine import env
from jobyard.job_engine.flow import runtime
from jobyard.job_engine.registry import load_job_modules
from jobyard.queue import keys
from tests.api.conftest import ApiServer
from tests.api.test_priority_api import pretend_a_live_worker
from tests.flow_jobs import ONE_THREAD_QUEUE
from tests.support import RedisServer


@pytest.fixture
def flow_api(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiServer]:
    monkeypatch.setenv(env.JOB_MODULES, "tests.jobs,tests.api.jobs_api,tests.flow_jobs")
    load_job_modules()
    runtime.reset()  # the permit store of this test's database
    yield api
    runtime.reset()


def test_a_payload_without_its_key_is_422_and_starts_nothing(
    flow_api: ApiServer, redis_server: RedisServer
) -> None:
    pretend_a_live_worker(redis_server, "flow")
    response = flow_api.client.post("/jobs/test.flow_maybe_keyed", json={"marker_dir": "/tmp"})
    assert response.status_code == 422, response.text
    assert "flow-control key 'tenant'" in response.text
    client = redis_server.client()
    assert client.keys(f"{keys.job_prefix()}*") == []
    client.close()


def test_a_held_job_shows_why_it_waits(
    flow_api: ApiServer, redis_server: RedisServer, admin_token: str
) -> None:
    pretend_a_live_worker(redis_server, ONE_THREAD_QUEUE)
    body = {"marker_dir": "/tmp", "tenant": "acme"}
    first = flow_api.client.post("/jobs/test.flow_one_slot", json=body)
    second = flow_api.client.post("/jobs/test.flow_one_slot", json=body)
    assert first.status_code == second.status_code == 202, second.text
    detail = flow_api.client.get(f"/jobs/{second.json()['job_id']}").json()
    assert (detail["state"], detail["display_state"]) == ("queued", "waiting for slot")
    assert detail["waiting_reason"] == (
        "concurrency limit concurrency:job:test.flow_one_slot (1 at once) for tenant=acme"
    )
    assert detail["run_at"] is not None  # when it asks again, unless woken first
    running = flow_api.client.get(f"/jobs/{first.json()['job_id']}").json()
    assert running["display_state"] == "queued"  # admitted: in the ready list
    as_admin = flow_api.admin(admin_token)
    buckets = flow_api.client.get("/flow", headers=as_admin).json()
    assert {"scope": "concurrency:job:test.flow_one_slot", "key": "acme", "running": 1,
            "waiting": 1, "recent_starts": 0} in buckets  # fmt: skip
    queues = {q["name"]: q for q in flow_api.client.get("/queues", headers=as_admin).json()}
    assert queues[ONE_THREAD_QUEUE]["held"] == 1
    metrics = flow_api.client.get("/metrics").text
    scope = "concurrency:job:test.flow_one_slot"
    assert f'jobyard_flow_waiting{{scope="{scope}"}} 1.0' in metrics
    assert f'jobyard_flow_running{{scope="{scope}"}} 1.0' in metrics
    assert f'jobyard_queue_held{{queue="{ONE_THREAD_QUEUE}"}} 1.0' in metrics


def test_a_collapsed_dispatch_names_the_run_that_serves_it(
    flow_api: ApiServer, redis_server: RedisServer
) -> None:
    pretend_a_live_worker(redis_server, "flow")
    body = {"marker_dir": "/tmp", "doc": "d-42", "value": 1}
    first = flow_api.client.post("/jobs/test.flow_debounce", json=body)
    second = flow_api.client.post("/jobs/test.flow_debounce", json={**body, "value": 2})
    assert first.status_code == second.status_code == 202, second.text
    assert first.json()["served_by"] is None
    assert second.json()["served_by"] == first.json()["job_id"]
    detail = flow_api.client.get(f"/jobs/{second.json()['job_id']}").json()
    assert (detail["display_state"], detail["served_by"]) == ("collapsed", first.json()["job_id"])
    run = flow_api.client.get(f"/jobs/{first.json()['job_id']}").json()
    assert (run["state"], run["display_state"]) == ("queued", "debouncing")

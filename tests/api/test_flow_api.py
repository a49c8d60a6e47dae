"""Flow control over HTTP: a payload without its limit's key is a 422 and starts nothing; a
job a limit holds says so in GET /jobs/{id} (`display_state`, `waiting_reason`) and in its
event stream (GET /jobs/{id}/events, on both engines), and GET /flow lists the key holding
it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobyard.job_engine import env
from jobyard.job_engine.flow import runtime
from jobyard.job_engine.registry import load_job_modules
from jobyard.queue import keys
from tests.api.conftest import ApiServer
from tests.api.test_events import read_stream
from tests.api.test_lifecycle import dispatch
from tests.api.test_priority_api import pretend_a_live_worker
from tests.engines import Engines
from tests.flow_jobs import FLOW_QUEUE, ONE_THREAD_QUEUE, RATE_CALLS
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


def test_a_held_job_says_why_in_its_event_stream_at_dispatch(
    flow_api: ApiServer, redis_server: RedisServer
) -> None:
    # Held from its dispatch (its key's one slot is taken): its first event, "queued", says why.
    pretend_a_live_worker(redis_server, ONE_THREAD_QUEUE)
    body = {"marker_dir": "/tmp", "tenant": "acme"}
    dispatch(flow_api, "test.flow_one_slot", body)
    held = dispatch(flow_api, "test.flow_one_slot", body)
    (first,) = read_stream(flow_api, held, stop_after=lambda event: True)
    assert (first["state"], first["display_state"]) == ("queued", "waiting for slot"), first
    assert first["waiting_reason"] == (
        "concurrency limit concurrency:job:test.flow_one_slot (1 at once) for tenant=acme"
    )
    assert first["run_at"] is not None  # when it asks again, unless woken first


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_a_throttled_job_says_why_in_its_event_stream(
    flow_api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    engine: str,
) -> None:
    # Held at its start on a worker (RATE_CALLS starts per second per tenant; two more than
    # that are dispatched at once): the worker records why, and the stream shows it, then the
    # run, whose events say nothing of a hold.
    monkeypatch.setenv(env.USE_DRAMATIQ, str(engine == "dramatiq").lower())
    if engine == "dramatiq":
        engines.start_worker(queues=FLOW_QUEUE)
    else:
        engines.start_temporal_worker()
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    body = {"marker_dir": str(tmp_path), "tenant": tenant}
    job_ids = [dispatch(flow_api, "test.flow_rate", body) for _ in range(RATE_CALLS + 2)]
    for job_id in job_ids:
        flow_api.wait_for(job_id, lambda job: job["state"] == "succeeded", engines=engines)
    streams = {job_id: read_stream(flow_api, job_id) for job_id in job_ids}
    reason = f"rate limit rate:job:test.flow_rate ({RATE_CALLS} starts per 1s) for tenant={tenant}"
    held = {
        job_id: [e for e in events if e.get("display_state") == "throttled"]
        for job_id, events in streams.items()
    }
    throttled = [job_id for job_id, events in held.items() if events]
    assert len(throttled) >= 2, (streams, engines.logs())
    for job_id in throttled:
        events = streams[job_id]
        assert [e["state"] for e in events if e["kind"] == "state"][-1] == "succeeded", events
        for event in held[job_id]:
            assert (event["state"], event["waiting_reason"]) == ("queued", reason), event
            assert event["engine"] == engine and event["run_at"] is not None, event
        running = [e for e in events if e.get("state") == "running"]
        assert running and all("display_state" not in e for e in running), events

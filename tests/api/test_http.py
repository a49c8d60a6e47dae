"""The HTTP contract at the boundary: status codes, error bodies and headers, on a real server
with real Redis and Temporal behind it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from jobyard.api import create_app
from jobyard.dispatcher import reset_dispatcher
from jobyard.job_engine import env
from tests.api.conftest import ApiServer, on_engine
from tests.api.jobs_api import REQUIRED_SETTING
from tests.engines import Engines
from tests.support import ROOT, RedisServer, free_port, wait_for


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_dispatch_answers_202_and_the_status_url_reaches_the_result(
    shared_api: ApiServer, shared_engines: Engines, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    on_engine(shared_engines, monkeypatch, engine)
    job_id = f"echo-{engine}-{uuid.uuid4().hex[:8]}"
    payload = {"hello": "world", "n": 7}

    response = shared_api.client.post("/jobs/system.echo", json=payload, params={"job_id": job_id})

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["job_id"] == job_id
    assert body["engine"] == engine
    assert body["status_url"] == f"/jobs/{job_id}"
    assert response.headers["Location"] == body["status_url"]
    assert body["duplicate"] is False
    done = shared_api.wait_for(job_id, lambda j: j["state"] == "succeeded", engines=shared_engines)
    assert done["result"] == payload
    assert done["engine"] == engine
    assert done["name"] == "system.echo"


def test_a_second_dispatch_with_the_same_job_id_starts_nothing(
    shared_api: ApiServer, shared_engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_engine(shared_engines, monkeypatch, "dramatiq")
    job_id = f"dup-{uuid.uuid4().hex[:8]}"
    first = shared_api.client.post("/jobs/system.echo", json={"a": 1}, params={"job_id": job_id})
    second = shared_api.client.post("/jobs/system.echo", json={"a": 1}, params={"job_id": job_id})
    other = shared_api.client.post("/jobs/system.echo", json={"a": 2}, params={"job_id": job_id})
    assert (first.status_code, second.status_code, other.status_code) == (202, 202, 409)
    assert first.json()["duplicate"] is False
    assert second.json()["duplicate"] is True
    done = shared_api.wait_for(job_id, lambda j: j["state"] == "succeeded", engines=shared_engines)
    assert done["result"] == {"a": 1}


def test_unknown_job_name_is_404_with_the_known_names(api: ApiServer) -> None:
    response = api.client.post("/jobs/no.such.job", json={})
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert "no.such.job" in detail
    assert "system.echo" in detail  # the error lists the jobs that do exist


def test_invalid_payload_is_422_with_pydantic_errors(api: ApiServer) -> None:
    response = api.client.post("/jobs/test.slow", json={"seconds": "soon"})
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert {"type": "float_parsing", "loc": ["body", "seconds"]}.items() <= errors[0].items()


@pytest.mark.parametrize(
    "body", [b"{not json", b"", b"\xff\xfe"], ids=["malformed", "empty", "not-utf8"]
)
def test_a_body_that_is_not_json_is_422(api: ApiServer, body: bytes) -> None:
    response = api.client.post(
        "/jobs/system.echo", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"job_id": "bad id with spaces"}, "job_id"),
        ({"delay": "-1"}, "delay"),
        ({"delay": str(8 * 24 * 3600)}, "delay"),
        ({"webhook_url": "ftp://example.com/x"}, "webhook_url"),
        ({"webhook_url": "not a url"}, "webhook_url"),
    ],
)
def test_bad_query_parameters_are_422_naming_the_parameter(
    api: ApiServer, params: dict[str, str], field: str
) -> None:
    response = api.client.post("/jobs/system.echo", json={}, params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", field]


def test_a_missing_server_setting_is_503_naming_it(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(REQUIRED_SETTING, raising=False)
    response = api.client.post("/jobs/api.needs_setting", json={"value": 1})
    assert response.status_code == 503
    assert response.json()["missing_settings"] == [REQUIRED_SETTING]
    assert "Retry-After" not in response.headers  # it will not fix itself by waiting


def test_no_engine_available_is_503_with_retry_after(
    api: ApiServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_server.kill()
    monkeypatch.setenv(env.TEMPORAL_ADDRESS, f"127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv(env.TEMPORAL_START_TIMEOUT, "0.5")
    reset_dispatcher()

    response = api.client.post("/jobs/system.echo", json={}, params={"job_id": "nowhere-1"})

    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert "nowhere-1" in response.json()["detail"]


def test_status_of_an_unknown_job_is_404(api: ApiServer) -> None:
    response = api.client.get(f"/jobs/never-dispatched-{uuid.uuid4().hex[:8]}")
    assert response.status_code == 404
    assert "never-dispatched" in response.json()["detail"]


def test_job_ids_with_slashes_round_trip(
    shared_api: ApiServer, shared_engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_engine(shared_engines, monkeypatch, "dramatiq")
    job_id = f"tenant/7/report-{uuid.uuid4().hex[:6]}"
    response = shared_api.client.post("/jobs/system.echo", json={"x": 1}, params={"job_id": job_id})
    assert response.status_code == 202
    status_url = response.json()["status_url"]
    assert "%2F" in status_url
    shared_api.wait_for(job_id, lambda j: j["state"] == "succeeded", engines=shared_engines)
    assert shared_api.client.get(status_url).json()["job_id"] == job_id


def test_health_reports_each_engine(
    api: ApiServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    both = api.client.get("/health")
    assert both.status_code == 200
    assert both.json() == {"status": "ok", "redis": True, "temporal": True}

    redis_server.kill()
    temporal_only = api.client.get("/health")
    assert temporal_only.status_code == 200  # dispatch still works: it falls back to Temporal
    assert temporal_only.json() == {"status": "ok", "redis": False, "temporal": True}

    monkeypatch.setenv(env.TEMPORAL_ADDRESS, f"127.0.0.1:{free_port()}")
    neither = api.client.get("/health")
    assert neither.status_code == 503
    assert neither.json() == {"status": "unavailable", "redis": False, "temporal": False}


def test_metrics_are_prometheus_text_and_count_dispatches(
    api: ApiServer, engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_engine(engines, monkeypatch, "dramatiq")
    assert api.client.post("/jobs/system.echo", json={}).status_code == 202
    response = api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = [line for line in response.text.splitlines() if not line.startswith("#")]
    assert any(
        line.startswith("jobyard_dispatched_total{") and 'name="system.echo"' in line
        for line in samples
    ), response.text


def test_openapi_document_needs_a_token_and_no_cdn_docs_page_is_served(api: ApiServer) -> None:
    assert api.anonymous.get("/openapi.json").status_code == 401
    spec = api.client.get("/openapi.json").json()
    for path in ("/jobs/{name}", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/replay", "/dead",
                 "/queues", "/workers", "/health", "/metrics"):  # fmt: skip
        assert path in spec["paths"], path
    assert "requestBody" in spec["paths"]["/jobs/{name}"]["post"]
    assert "BearerToken" in spec["components"]["securitySchemes"]
    assert "/openapi.json" not in spec["paths"]
    # Swagger UI loads its scripts from a CDN: no page of ours does that
    assert api.client.get("/docs").status_code == 404


def test_dashboard_is_one_self_contained_page(api: ApiServer) -> None:
    response = api.client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script>" in page and "<style>" in page
    # nothing fetched from another origin: the machines running it have no internet
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page


def test_mounted_under_a_prefix_links_stay_inside_the_mount(
    jobyard_env: dict[str, str],
    api_job_modules: None,
    job_log_db: str,
    api_token: str,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    on_engine(engines, monkeypatch, "dramatiq")
    web_app = FastAPI()
    web_app.mount("/jobyard", create_app())
    with TestClient(web_app, headers={"Authorization": f"Bearer {api_token}"}) as client:
        response = client.post("/jobyard/jobs/system.echo", json={"m": 1})
        assert response.status_code == 202, response.text
        status_url = response.json()["status_url"]
        assert status_url == f"/jobyard/jobs/{response.json()['job_id']}"
        engines.wait(response.json()["job_id"])
        assert client.get(status_url).json()["result"] == {"m": 1}
        assert client.get("/jobyard/dashboard").status_code == 200


def test_serve_runs_the_api_on_the_given_port(jobyard_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    code = f"from jobyard.api import serve; serve('127.0.0.1', {port})"
    output = tmp_path / "serve.log"
    with output.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ), cwd=ROOT,
                                stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    try:

        def answers() -> bool:
            assert proc.poll() is None, output.read_text()
            # Our uvicorn, with its signal handlers in place (not another test's server on a
            # reused port, and not a process still importing, which SIGINT would just kill).
            if f"Uvicorn running on http://127.0.0.1:{port}" not in output.read_text():
                return False
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, timeout=30)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0  # a graceful stop on SIGINT

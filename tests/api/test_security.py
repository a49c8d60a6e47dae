"""Issue 12, "Closed by default", row by row against the real API server (uvicorn on a port),
real Redis, Temporal and PostgreSQL, and a real worker where a job must run."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from jobyard.job_engine import env
from tests.api.conftest import ApiServer, on_engine
from tests.engines import Engines
from tests.support import RedisServer, free_port


def _absent(api: ApiServer, job_id: str) -> None:
    """Nothing was started under `job_id` on either engine, nor logged."""
    assert api.client.get(f"/jobs/{job_id}").status_code == 404


# --- critical/high: jobs an API client must never start ---------------------------------------


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("maintenance.file_cleanup", {"directory": "/any/path", "ttl_seconds": 0}),
        ("maintenance.token_cleanup", {"before": "9999-12-31T00:00:00Z"}),
        ("webhook.deliver", {"url": "https://example.com/hook", "body": {"forged": True}}),
    ],
)
def test_http_false_jobs_are_403_whatever_the_token(
    api: ApiServer, admin_token: str, tmp_path: Path, name: str, payload: dict
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    if name == "maintenance.file_cleanup":
        payload = {**payload, "directory": str(tmp_path)}
    for headers in ({}, api.admin(admin_token)):  # the API token, then the admin token
        job_id = f"forbidden-{uuid.uuid4().hex[:8]}"
        response = api.client.post(
            f"/jobs/{name}", json=payload, params={"job_id": job_id}, headers=headers
        )
        assert response.status_code == 403, response.text
        assert "cannot be started over HTTP" in response.json()["detail"]
        _absent(api, job_id)
    assert victim.read_text() == "keep me"


def test_jobs_with_side_effects_need_a_token(api: ApiServer) -> None:
    for name, payload in [
        ("email.send", {"to": ["a@example.com"], "subject": "x", "text": "y"}),
        ("ai.generate", {"prompt": "spend the quota"}),
    ]:
        assert api.anonymous.post(f"/jobs/{name}", json=payload).status_code == 401


# --- high: CSRF ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b'{"a": 1}'),  # <form enctype="text/plain"> and fetch(no-cors)
        ("application/x-www-form-urlencoded", b"a=1"),
        ("multipart/form-data; boundary=x", b"--x--"),
        (None, b'{"a": 1}'),
    ],
)
def test_state_changing_routes_take_only_json(
    api: ApiServer, content_type: str | None, body: bytes
) -> None:
    job_id = f"csrf-{uuid.uuid4().hex[:8]}"
    headers = {"Content-Type": content_type} if content_type else {}
    response = api.client.post(
        "/jobs/system.echo", content=body, headers=headers, params={"job_id": job_id}
    )
    if content_type is None:  # httpx sends none: the guard refuses a body it cannot type
        assert response.status_code == 415
    else:
        assert response.status_code == 415, response.text
    _absent(api, job_id)


def test_a_foreign_origin_is_refused_and_the_own_or_an_allowed_one_is_not(
    api: ApiServer, admin_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = f"origin-{uuid.uuid4().hex[:8]}"
    for origin in ("https://evil.example", "null", f"http://127.0.0.1:{api.port}.evil.example"):
        response = api.client.post(
            "/jobs/system.echo", json={}, params={"job_id": job_id}, headers={"Origin": origin}
        )
        assert response.status_code == 403, (origin, response.text)
        cancel = api.client.delete(
            f"/jobs/{job_id}", headers={"Origin": origin, **api.admin(admin_token)}
        )
        assert cancel.status_code == 403
    _absent(api, job_id)

    own = api.client.post("/jobs/system.echo", json={}, headers={"Origin": api.url})
    assert own.status_code == 202, own.text
    monkeypatch.setenv(env.ALLOWED_ORIGINS, "https://app.example, https://admin.example")
    allowed = api.client.post(
        "/jobs/system.echo", json={}, headers={"Origin": "https://admin.example"}
    )
    assert allowed.status_code == 202, allowed.text


# --- high: SSRF at dispatch ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "http://2130706433/",
        "http://127.1/",
        "http://0x7f.0.0.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.5/",
        "http://100.64.0.1/",
        "http://[fd00::1]/",
        "http://[::1]/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://localhost:8000/",
    ],
)
def test_a_literal_private_webhook_url_is_422_at_dispatch(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.delenv(env.WEBHOOK_ALLOW, raising=False)
    job_id = f"ssrf-{uuid.uuid4().hex[:8]}"
    response = api.client.post(
        "/jobs/system.echo", json={}, params={"job_id": job_id, "webhook_url": url}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "webhook_url"]
    _absent(api, job_id)


def test_the_allow_list_opens_a_named_private_address(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.WEBHOOK_ALLOW, "10.0.0.0/8")
    response = api.client.post(
        "/jobs/system.echo", json={}, params={"webhook_url": "http://10.1.2.3/hook"}
    )
    assert response.status_code == 202, response.text
    refused = api.client.post(
        "/jobs/system.echo", json={}, params={"webhook_url": "http://192.168.0.1/hook"}
    )
    assert refused.status_code == 422


# --- medium-high: sizes -------------------------------------------------------------------------


def test_a_payload_over_the_limit_is_413_before_any_engine(api: ApiServer) -> None:
    job_id = f"big-{uuid.uuid4().hex[:8]}"
    payload = {"blob": "x" * (512 * 1024)}  # the default JOBYARD_MAX_PAYLOAD_BYTES, plus keys
    response = api.client.post("/jobs/system.echo", json=payload, params={"job_id": job_id})
    assert response.status_code == 413, response.text[:300]
    assert response.json()["limit"] == 512 * 1024
    _absent(api, job_id)


def test_the_limit_is_a_setting(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.MAX_PAYLOAD_BYTES, "100")
    assert api.client.post("/jobs/system.echo", json={"a": "x" * 50}).status_code == 202
    assert api.client.post("/jobs/system.echo", json={"a": "x" * 100}).status_code == 413


def test_request_bodies_are_capped(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    body = b'{"a": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    headers = {"Content-Type": "application/json"}
    response = api.client.post("/jobs/system.echo", content=body, headers=headers)
    assert response.status_code == 413

    def chunks():  # no Content-Length: the cap holds while reading
        for _ in range(40):
            yield b"x" * 65536

    chunked = api.client.post("/jobs/system.echo", content=chunks(), headers=headers)
    assert chunked.status_code == 413
    monkeypatch.setenv(env.MAX_REQUEST_BYTES, "10")
    assert api.client.post("/jobs/system.echo", json={"a": "0123456789"}).status_code == 413


# --- medium: strict JSON and paging -------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": "\\udc00"}',
        b'{"\\ud800": 1}',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1e400}',
        b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}",
    ],
    ids=["lone-surrogate", "surrogate-key", "nan", "inf", "-inf", "overflow", "deep", "100-deep"],
)
def test_what_is_not_strict_json_is_422(api: ApiServer, body: bytes) -> None:
    response = api.client.post(
        "/jobs/system.echo", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert api.client.get("/jobs").status_code == 200  # nothing was stored to break a listing


@pytest.mark.parametrize(
    "params",
    [
        {"offset": "9223372036854775808"},
        {"offset": "-1"},
        {"offset": "99999999999"},
        {"limit": "0"},
        {"limit": "100000"},
        {"limit": "1e3"},
        {"state": "nonsense"},
        {"name": "a\x00b"},
        {"queue": "x" * 500},
    ],
)
def test_paging_and_filters_are_bounded_422_never_500(api: ApiServer, params: dict) -> None:
    for path in ("/jobs", "/dead"):
        if path == "/dead" and "state" in params:
            continue
        response = api.client.get(path, params=params)
        assert response.status_code == 422, (path, params, response.text)


# --- medium: listings are summaries; odd stored values break nothing; tracebacks for admins ---
# One test, one worker: starting a worker is the slow part.


def test_what_jobs_leave_behind_is_read_safely(
    api: ApiServer, engines: Engines, monkeypatch: pytest.MonkeyPatch, admin_token: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    on_engine(engines, monkeypatch, "dramatiq")
    tag = uuid.uuid4().hex[:8]
    echo, odd, flaky = f"summary-{tag}", f"odd-{tag}", f"trace-{tag}"
    payload = {"secret": "s3cr3t-payload"}
    for name, job_id, body in [
        ("system.echo", echo, payload),
        ("api.odd_result", odd, {}),
        ("api.flaky", flaky, {"marker_dir": str(tmp_path)}),
    ]:
        response = api.client.post(f"/jobs/{name}", json=body, params={"job_id": job_id})
        assert response.status_code == 202, response.text

    # the detail is whole
    detail = api.wait_for(  # the payload comes from the job log, written in batches
        echo, lambda j: j["state"] == "succeeded" and "payload" in j, engines=engines
    )
    assert detail["payload"] == payload and detail["result"] == payload
    # a result with a lone surrogate and NaN: the job's page and every listing still answer
    odd_detail = api.wait_for(odd, lambda j: j["state"] == "succeeded", engines=engines)
    assert odd_detail["result"]["number"] is None  # NaN cannot be JSON: it is shown as null
    api.wait_for(flaky, lambda j: j["state"] in ("dead", "failed"), engines=engines)

    def admin_view() -> dict:
        return api.client.get(f"/jobs/{flaky}", headers=api.admin(admin_token)).json()

    def logged() -> dict[str, dict]:
        return {j["job_id"]: j for j in api.client.get("/jobs").json()}

    deadline = time.monotonic() + 20  # the job log is written in batches
    while not (
        logged().get(echo, {}).get("state") == "succeeded" and admin_view().get("error_traceback")
    ):
        assert time.monotonic() < deadline, (logged(), admin_view())
        time.sleep(0.2)

    # listings are summaries: no payloads, results, progress or tracebacks
    for path in ("/jobs", "/dead", "/jobs?state=failed"):
        listing = api.client.get(path)
        assert listing.status_code == 200, listing.text
        assert "s3cr3t-payload" not in listing.text
        for row in listing.json():
            assert not {"payload", "result", "progress", "error_traceback"} & set(row)
    assert logged()[echo]["name"] == "system.echo"
    # tracebacks (server paths) for admin tokens only
    assert "Traceback" in admin_view()["error_traceback"]
    assert "error_traceback" not in api.job(flaky)  # the API token's view
    assert api.anonymous.get(f"/jobs/{flaky}").status_code == 401


# --- medium: services down: 503, Retry-After, nothing internal -----------------------------------


def _assert_honest_503(response, *internals: str) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    for secret in ("Traceback", "127.0.0.1", 'File "', *internals):
        assert secret not in response.text, response.text


def test_database_down_is_503_without_details(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv(env.DATABASE_URL, f"postgresql+psycopg://jobyard@127.0.0.1:{port}/gone")
    for path in ("/jobs", "/dead", "/jobs?state=failed"):
        _assert_honest_503(api.client.get(path), str(port))


def test_redis_down_is_503_without_details(
    api: ApiServer, admin_token: str, redis_server: RedisServer
) -> None:
    redis_server.kill()
    response = api.client.get("/queues", headers=api.admin(admin_token))
    _assert_honest_503(response, str(redis_server.port))


# --- low: headers -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/jobs", "/dashboard", "/no-such-route"])
def test_security_headers_on_every_answer(api: ApiServer, path: str) -> None:
    response = api.client.get(path)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    csp = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'none'" in csp
    if path == "/dashboard":  # only its own inline script and style, by hash
        assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp


def test_the_host_allow_list_is_optional_and_refuses_others(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert api.client.get("/jobs", headers={"Host": "rebound.example"}).status_code == 200
    monkeypatch.setenv(env.ALLOWED_HOSTS, "127.0.0.1, jobs.example.com")
    assert api.client.get("/jobs").status_code == 200
    assert api.client.get("/jobs", headers={"Host": "jobs.example.com"}).status_code == 200
    refused = api.client.get("/health", headers={"Host": "rebound.example"})
    assert refused.status_code == 400
    assert "rebound.example" in json.loads(refused.text)["detail"]


# --- medium: id squatting (the dispatcher raises IdempotencyConflictError) ----------------------


def test_an_id_taken_by_another_job_or_payload_is_409(api: ApiServer) -> None:
    job_id = f"order-{uuid.uuid4().hex[:8]}"
    first = api.client.post("/jobs/system.echo", json={"a": 1}, params={"job_id": job_id})
    assert first.status_code == 202
    same = api.client.post("/jobs/system.echo", json={"a": 1}, params={"job_id": job_id})
    assert same.status_code == 202 and same.json()["duplicate"] is True
    other_payload = api.client.post("/jobs/system.echo", json={"a": 2}, params={"job_id": job_id})
    assert other_payload.status_code == 409
    other_name = api.client.post("/jobs/api.needs_setting", json={}, params={"job_id": job_id})
    assert other_name.status_code == 409

"""Tokens, closed by default: every route but GET /health needs a bearer token; an API token
dispatches and reads, an admin token also steers (403 for an API token there); several values
per kind so tokens rotate; nothing configured means nothing open."""

from __future__ import annotations

import pytest

from jobyard.job_engine import env
from tests.api.conftest import ApiServer

ADMIN_ROUTES = [
    ("GET", "/queues"),
    ("GET", "/workers"),
    ("DELETE", "/jobs/some-job"),
    ("POST", "/jobs/some-job/replay"),
    ("GET", "/flow"),
    ("POST", "/codec/encode"),
    ("POST", "/codec/decode"),
]
TOKEN_ROUTES = [
    ("GET", "/jobs"),
    ("GET", "/dead"),
    ("GET", "/jobs/some-job"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("POST", "/jobs/system.echo"),
    ("POST", "/events/payment.confirmed"),
]
EVERY_ROUTE = ADMIN_ROUTES + TOKEN_ROUTES
ids = [f"{method} {path}" for method, path in EVERY_ROUTE]
admin_ids = [f"{method} {path}" for method, path in ADMIN_ROUTES]


def _request(client, method: str, path: str, headers: dict[str, str] | None = None):
    body = {"json": {}} if method == "POST" else {}
    return client.request(method, path, headers=headers or {}, **body)


@pytest.mark.parametrize("configured", ["unset", "empty", "commas"])
def test_with_no_token_configured_every_route_but_health_is_401(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch, configured: str
) -> None:
    value = {"unset": None, "empty": "", "commas": " , ,"}[configured]
    for name in (env.ADMIN_TOKEN, env.API_TOKEN):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    for method, path in EVERY_ROUTE:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer anything"}):
            response = _request(api.anonymous, method, path, headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert env.API_TOKEN in response.json()["detail"]  # says what the operator must set
    assert api.anonymous.get("/health").status_code == 200
    assert api.anonymous.get("/dashboard").status_code == 200  # a page without data


@pytest.mark.parametrize(("method", "path"), EVERY_ROUTE, ids=ids)
def test_a_wrong_token_is_401(api: ApiServer, admin_token: str, method: str, path: str) -> None:
    for authorization in (
        None,
        "Bearer wrong-token",
        "Basic dXNlcjpwYXNz",
        "Bearer ünïcode",
        "bearer",
        f"Bearer {admin_token}x",
        f"Bearer {admin_token[:-1]}",
    ):
        headers = {} if authorization is None else {"Authorization": authorization.encode()}
        response = api.anonymous.request(
            method, path, headers=headers, **({"json": {}} if method == "POST" else {})
        )
        assert response.status_code == 401, (authorization, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES, ids=admin_ids)
def test_an_api_token_is_403_on_admin_routes(
    api: ApiServer, admin_token: str, method: str, path: str
) -> None:
    response = _request(api.client, method, path)  # api.client sends the API token
    assert response.status_code == 403
    assert env.ADMIN_TOKEN in response.json()["detail"]


def test_an_api_token_dispatches_and_reads(api: ApiServer) -> None:
    response = api.client.post("/jobs/system.echo", json={"a": 1}, params={"job_id": "auth-api-1"})
    assert response.status_code == 202, response.text
    assert api.client.get("/jobs").status_code == 200
    assert api.client.get("/dead").status_code == 200
    assert api.client.get("/metrics").status_code == 200
    assert api.client.get("/jobs/auth-api-1").status_code == 200


def test_the_right_token_opens_the_admin_routes(api: ApiServer, admin_token: str) -> None:
    headers = api.admin(admin_token)
    queues = api.client.get("/queues", headers=headers)
    assert queues.status_code == 200, queues.text
    assert {"default", "data-sync", "scheduled"} <= {q["name"] for q in queues.json()}
    workers = api.client.get("/workers", headers=headers)
    assert workers.status_code == 200, workers.text
    assert workers.json() == []  # no worker started in this test
    # past the guard, an unknown job is the route's own 404
    assert api.client.delete("/jobs/no-such-job", headers=headers).status_code == 404
    assert api.client.post("/jobs/no-such-job/replay", headers=headers).status_code == 404
    # and an admin token does everything an API token does
    assert api.client.get("/jobs", headers=headers).status_code == 200
    dispatched = api.client.post("/jobs/system.echo", json={}, headers=headers)
    assert dispatched.status_code == 202


def test_several_values_each_so_tokens_rotate_without_a_restart(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.ADMIN_TOKEN, "first")
    assert api.anonymous.get("/queues", headers=api.admin("first")).status_code == 200
    monkeypatch.setenv(env.ADMIN_TOKEN, "first, second")  # both valid while clients move over
    assert api.anonymous.get("/queues", headers=api.admin("first")).status_code == 200
    assert api.anonymous.get("/queues", headers=api.admin("second")).status_code == 200
    monkeypatch.setenv(env.ADMIN_TOKEN, "second")
    assert api.anonymous.get("/queues", headers=api.admin("first")).status_code == 401
    assert api.anonymous.get("/queues", headers=api.admin("second")).status_code == 200

    monkeypatch.setenv(env.API_TOKEN, "app-old,app-new")
    for token in ("app-old", "app-new"):
        assert api.anonymous.get("/jobs", headers=api.admin(token)).status_code == 200
        assert api.anonymous.get("/queues", headers=api.admin(token)).status_code == 403


def test_health_needs_no_token_and_tells_nothing_else(api: ApiServer) -> None:
    response = api.anonymous.get("/health")
    assert response.status_code == 200
    assert set(response.json()) == {"status", "redis", "temporal"}

"""Admin routes: disabled (403) without JOBYARD_ADMIN_TOKEN, 401 for a wrong or missing token,
open with the right one. Public routes need no token."""

from __future__ import annotations

import pytest

from jobyard.job_engine import env
from tests.api.conftest import ApiServer

ADMIN_ROUTES = [
    ("GET", "/queues"),
    ("GET", "/workers"),
    ("DELETE", "/jobs/some-job"),
    ("POST", "/jobs/some-job/replay"),
]
ids = [f"{method} {path}" for method, path in ADMIN_ROUTES]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES, ids=ids)
@pytest.mark.parametrize("configured", ["unset", "empty"])
def test_admin_routes_are_disabled_without_a_configured_token(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch, method: str, path: str, configured: str
) -> None:
    if configured == "unset":
        monkeypatch.delenv(env.ADMIN_TOKEN, raising=False)
    else:
        monkeypatch.setenv(env.ADMIN_TOKEN, "")
    response = api.client.request(method, path, headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403
    assert response.json()["detail"] == "admin API disabled: set JOBYARD_ADMIN_TOKEN"


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES, ids=ids)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "Basic dXNlcjpwYXNz", "Bearer ünïcode"],
    ids=["missing", "wrong", "not-bearer", "non-ascii"],
)
def test_admin_routes_refuse_a_wrong_token(
    api: ApiServer, admin_token: str, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = api.client.request(method, path, headers={k: v.encode() for k, v in headers.items()})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


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


def test_the_token_is_read_per_request_so_it_can_be_rotated(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.ADMIN_TOKEN, "first")
    assert api.client.get("/queues", headers=api.admin("first")).status_code == 200
    monkeypatch.setenv(env.ADMIN_TOKEN, "second")
    assert api.client.get("/queues", headers=api.admin("first")).status_code == 401
    assert api.client.get("/queues", headers=api.admin("second")).status_code == 200


@pytest.mark.parametrize("path", ["/jobs", "/dead", "/health", "/metrics", "/dashboard"])
def test_public_routes_need_no_token(api: ApiServer, admin_token: str, path: str) -> None:
    assert api.client.get(path).status_code == 200

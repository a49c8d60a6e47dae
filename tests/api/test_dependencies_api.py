"""`after` over HTTP: repeated query parameters of POST /jobs/{name}; an unknown id or a bad
`after_failure` is a 422 naming `after`, and nothing is started."""

from __future__ import annotations

import pytest

from jobyard.queue import keys
from tests.api.conftest import ApiServer, on_engine
from tests.support import RedisServer


def test_a_job_dispatched_after_another_runs_once_it_ended(api: ApiServer, engines, monkeypatch):
    on_engine(engines, monkeypatch, "dramatiq")
    first = api.client.post("/jobs/system.echo", json={"n": 1})
    assert first.status_code == 202, first.text
    upstream = first.json()["job_id"]
    second = api.client.post("/jobs/system.echo", json={"n": 2}, params={"after": [upstream]})
    assert second.status_code == 202, second.text
    detail = api.wait_for(second.json()["job_id"], lambda d: d["state"] == "succeeded", 60)
    assert detail["result"] == {"n": 2}


@pytest.mark.parametrize(
    "params",
    [{"after": ["no-such-job"]}, {"after": ["bad id!"]}, {"after": ["x"], "after_failure": "no"}],
)
def test_a_bad_after_is_422_and_starts_nothing(
    api: ApiServer, redis_server: RedisServer, params: dict
) -> None:
    response = api.client.post("/jobs/system.echo", json={}, params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0:2] in (
        ["query", "after"],
        ["query", "after_failure"],
    )
    client = redis_server.client()
    assert client.keys(f"{keys.job_prefix()}*") == []
    client.close()

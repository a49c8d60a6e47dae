"""`priority` over HTTP: a query parameter of POST /jobs/{name}, as `delay` is (the body is
the payload); out of range or not an int is a 422 naming it, and nothing is started."""

from __future__ import annotations

import pytest

from jobyard.queue import keys
from tests.api.conftest import ApiServer
from tests.support import RedisServer


def pretend_a_live_worker(redis_server: RedisServer, queue: str) -> None:
    client = redis_server.client()
    seconds, _ = client.time()
    client.zadd(keys.workers(queue), {"placeholder": (seconds + 600) * 1000})
    client.close()


def test_a_dispatch_with_a_priority_waits_in_its_band(
    api: ApiServer, redis_server: RedisServer
) -> None:
    pretend_a_live_worker(redis_server, "default")
    response = api.client.post("/jobs/system.echo", json={}, params={"priority": "-42"})
    assert response.status_code == 202, response.text
    client = redis_server.client()
    assert client.llen(keys.band("default", -42)) == 1
    client.close()


@pytest.mark.parametrize("bad", ["101", "-101", "1.5", "high", ""])
def test_a_bad_priority_is_422_naming_it_and_starts_nothing(
    api: ApiServer, redis_server: RedisServer, bad: str
) -> None:
    pretend_a_live_worker(redis_server, "default")
    response = api.client.post("/jobs/system.echo", json={}, params={"priority": bad})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "priority"]
    client = redis_server.client()
    assert client.keys(f"{keys.job_prefix()}*") == []
    client.close()

"""GET /jobs and GET /dead: summaries (no payload, result or progress: those are on the job's
own page), keyset pages that neither skip nor repeat a row, filters and search by id. The job
log is filled through joblog.upsert, the path every writer takes."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from jobyard.job_engine.db import joblog
from tests.api.conftest import ApiServer

BIG = "x" * 2_000_000  # 2 MB of payload and of result per job


def write(rows: list[dict[str, Any]]) -> None:
    joblog.upsert(rows)


def row(job_id: str, at: float, **fields: Any) -> dict[str, Any]:
    return {
        "job_id": job_id, "name": "api.steps", "queue": "default", "engine": "dramatiq",
        "state": "succeeded", "enqueued_at": at, "state_at": at + 1, **fields,
    }  # fmt: skip


def pages(api: ApiServer, path: str, **params: Any) -> list[list[dict[str, Any]]]:
    found, cursor = [], None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = api.client.get(path, params=query)
        assert response.status_code == 200, response.text
        found.append(response.json())
        cursor = response.headers.get("X-Next-Cursor")
        if cursor is None:
            return found
        assert 'rel="next"' in response.headers["Link"]


def test_listings_carry_summaries_and_the_detail_the_payload(api: ApiServer) -> None:
    now = time.time()
    write([
        row(f"big-{n}", now + n, payload={"blob": BIG}, result={"blob": BIG}, progress=1.0,
            error_message="e" * 5000, state="dead" if n == 2 else "succeeded")
        for n in range(3)
    ])  # fmt: skip

    listing = api.client.get("/jobs")
    assert listing.status_code == 200
    assert len(listing.content) < 10_000, len(listing.content)  # 12 MB stored
    jobs = listing.json()
    assert [j["job_id"] for j in jobs] == ["big-2", "big-1", "big-0"]
    for job in jobs:
        assert not {"payload", "result", "progress", "error_traceback"} & set(job)
        assert len(job["error_message"]) <= 301
        assert job["display_state"] == job["state"]
    dead = api.client.get("/dead")
    assert len(dead.content) < 5_000 and [j["job_id"] for j in dead.json()] == ["big-2"]

    detail = api.job("big-1")
    assert detail["payload"] == {"blob": BIG} and detail["result"] == {"blob": BIG}


def test_keyset_pages_see_every_job_once_in_order(api: ApiServer) -> None:
    start = time.time() - 1000
    # 130 jobs, with runs of equal enqueue times: the job id breaks the ties
    write([row(f"job-{n:03d}", start + n // 3) for n in range(130)])

    got = pages(api, "/jobs", limit=50)

    assert [len(p) for p in got] == [50, 50, 30]
    ids = [j["job_id"] for p in got for j in p]
    # newest first; among equal times, the greater id first
    expected = sorted((f"job-{n:03d}" for n in range(130)), key=lambda i: (int(i[4:]) // 3, i))
    assert ids == expected[::-1]
    # a job enqueued meanwhile does not shift the pages that follow
    first = api.client.get("/jobs", params={"limit": 50})
    write([row("job-new", time.time())])
    second = api.client.get(
        "/jobs", params={"limit": 50, "cursor": first.headers["X-Next-Cursor"]}
    ).json()
    assert [j["job_id"] for j in second] == ids[50:100]
    bad = api.client.get("/jobs", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422


def test_filters_and_search_by_id(api: ApiServer) -> None:
    base = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
    write([
        row("invoice-1", base, state="dead", queue="billing", name="bill.send"),
        row("invoice-2", base + 3600, state="succeeded", queue="billing", name="bill.send",
            engine="temporal"),
        row("report-1", base + 7200, state="failed", name="report.build"),
        row("in_voice", base + 10800),  # "_" is not a wildcard in the search
    ])  # fmt: skip

    def ids(path: str = "/jobs", **params: Any) -> list[str]:
        response = api.client.get(path, params=params)
        assert response.status_code == 200, response.text
        return [j["job_id"] for j in response.json()]

    assert ids(state="dead") == ["invoice-1"]
    assert ids(queue="billing") == ["invoice-2", "invoice-1"]
    assert ids(name="report.build") == ["report-1"]
    assert ids(engine="temporal") == ["invoice-2"]
    assert ids(since="2026-03-01T01:00:00Z", until="2026-03-01T03:00:00Z") == [
        "report-1", "invoice-2",
    ]  # fmt: skip
    assert ids(job_id="invoice-2") == ["invoice-2"]
    assert ids(job_id="invoice") == ["invoice-2", "invoice-1"]
    assert ids(job_id="in_") == ["in_voice"]
    assert ids(job_id="nothing") == []
    assert ids("/dead", queue="billing") == ["invoice-1"]
    assert ids("/dead", queue="default") == []

"""What the dashboard reads beyond the listings: a job's step timeline on both engines, the
per-queue history graphs from the job log, and replaying several dead jobs at once."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jobyard.dispatcher.stats import queue_history
from jobyard.job_engine import env
from jobyard.job_engine.db import joblog
from jobyard.job_engine.db.jobstats import BUCKETS, bucket_of, percentile
from jobyard.job_engine.db.migrate import upgrade
from tests.api.conftest import ApiServer, on_engine
from tests.api.jobs_api import ALLOW_FILE
from tests.api.test_lifecycle import dispatch
from tests.engines import Engines


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_timeline_shows_each_step_and_sleep_with_its_engine(
    api: ApiServer, engines: Engines, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, engine: str
) -> None:
    on_engine(engines, monkeypatch, engine)
    job_id = dispatch(api, "api.nap", {"marker_dir": str(tmp_path), "nap": 1.5})
    api.wait_for(job_id, lambda j: j["state"] == "succeeded", engines=engines)

    response = api.client.get(f"/jobs/{job_id}/timeline")

    assert response.status_code == 200, response.text
    timeline = response.json()
    steps = [e for e in timeline if e["kind"] == "step"]
    assert [s["name"] for s in steps] == ["first", "second"], timeline
    for step in steps:
        assert step["engine"] == engine and step["attempts"] == 1
        assert step["state"] == "succeeded" and step["duration_ms"] >= 0
        assert step["started_at"] <= step["finished_at"]
    (sleep,) = [e for e in timeline if e["kind"] == "sleep"]
    assert sleep["engine"] == engine
    # the same shape on both engines: numbered, with its start, wake time and length
    assert (sleep["name"], sleep["state"]) == ("sleep 1", "slept"), sleep
    assert sleep["started_at"] is not None and sleep["wake_at"] is not None, sleep
    assert 1400 <= sleep["duration_ms"] <= 10_000, sleep
    assert steps[0]["finished_at"] <= sleep["finished_at"] <= steps[1]["started_at"]
    assert "__timing__:first" not in api.job(job_id)["steps"]
    assert api.client.get("/jobs/no-such-job/timeline").status_code == 404


def _rows(now: float) -> list[dict[str, Any]]:
    rows = []
    for n in range(20):  # 20 jobs on "default" in the last 10 minutes: 100..2000 ms each
        start = now - 600 + n * 25
        rows.append({
            "job_id": f"graph-{n}", "name": "api.steps", "queue": "default", "engine": "dramatiq",
            "state": "dead" if n % 5 == 0 else "succeeded", "enqueued_at": start - 0.5,
            "started_at": start, "finished_at": start + (n + 1) / 10, "state_at": start + 1,
            "duration_ms": (n + 1) * 100,
        })  # fmt: skip
    rows.append({  # an hour ago: outside a 30-minute window
        "job_id": "graph-old", "name": "api.steps", "queue": "other", "state": "succeeded",
        "enqueued_at": now - 3600, "started_at": now - 3600, "finished_at": now - 3590,
        "state_at": now - 3590, "duration_ms": 10_000,
    })  # fmt: skip
    return rows


def _check_history(history: dict[str, Any]) -> None:
    assert list(history["queues"]) == ["default"]
    points = history["queues"]["default"]
    assert len(points) == 6 and history["bucket_seconds"] == 300
    assert sum(p["finished"] for p in points) == 20
    assert sum(p["failed"] for p in points) == 4
    busy = [p for p in points if p["finished"]]
    assert all(p["run_p50_ms"] <= p["run_p95_ms"] for p in busy)
    # 500 ms waits: in the histogram's (250, 500] ms bucket... or its neighbour's edge
    assert all(250 <= p["wait_p50_ms"] <= 1000 for p in busy)
    runs = [p["run_p95_ms"] for p in busy]
    assert max(runs) <= 2500 and min(p["run_p50_ms"] for p in busy) >= 50
    assert datetime.fromisoformat(points[0]["t"]) < datetime.fromisoformat(points[-1]["t"])


def test_queue_history_on_postgresql(api: ApiServer) -> None:
    joblog.upsert(_rows(time.time()))
    response = api.client.get("/stats/queues", params={"window": 1800, "buckets": 6})
    assert response.status_code == 200, response.text
    _check_history(response.json())
    assert api.anonymous.get("/stats/queues").status_code == 401


def test_queue_history_on_sqlite_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'graphs.db'}"
    upgrade(url)
    monkeypatch.setenv(env.DATABASE_URL, url)
    now = time.time()
    joblog.upsert(_rows(now), url)
    history = queue_history(1800, 6, until=datetime.fromtimestamp(now, UTC) + timedelta(seconds=1))
    _check_history(history)
    # a histogram's quantile: interpolated inside the bucket that holds it
    counts = [0] * BUCKETS
    counts[bucket_of(300)] = 10  # ten jobs between 250 and 500 ms
    assert percentile(counts, 0.5) == 375 and percentile(counts, 1.0) == 500


def test_replay_several_dead_jobs_then_all_matching_a_filter(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
) -> None:
    on_engine(engines, monkeypatch, "dramatiq")
    dirs = [tmp_path / f"job{n}" for n in range(3)]
    ids = []
    for directory in dirs:
        directory.mkdir()
        ids.append(dispatch(api, "api.flaky", {"marker_dir": str(directory)}))
    for job_id in ids:
        api.wait_for(job_id, lambda j: j["state"] == "dead", engines=engines)
    for directory in dirs:
        (directory / ALLOW_FILE).touch()
    deadline = time.monotonic() + 10
    while len(api.client.get("/dead").json()) < 3:  # the job log is written in batches
        assert time.monotonic() < deadline
        time.sleep(0.2)
    admin = api.admin(admin_token)
    assert api.client.post("/dead/replay", json={"job_ids": ids[:2]}).status_code == 403

    response = api.client.post("/dead/replay", json={"job_ids": ids[:2]}, headers=admin)

    assert response.status_code == 200, response.text
    assert response.json()["replayed"] == 2
    for job_id in ids[:2]:
        api.wait_for(job_id, lambda j: j["state"] == "succeeded", engines=engines)
    assert api.job(ids[2])["state"] == "dead"
    again = api.client.post("/dead/replay", json={"job_ids": ids[:1]}, headers=admin).json()
    assert again["jobs"][ids[0]]["outcome"] == "active"  # succeeded: nothing to replay

    everything = api.client.post(
        "/dead/replay", json={"all": True, "name": "api.flaky", "queue": "default"}, headers=admin
    )
    assert everything.status_code == 200, everything.text
    assert list(everything.json()["jobs"]) == [ids[2]] and not everything.json()["more"]
    api.wait_for(ids[2], lambda j: j["state"] == "succeeded", engines=engines)
    assert api.client.post("/dead/replay", json={}, headers=admin).status_code == 422

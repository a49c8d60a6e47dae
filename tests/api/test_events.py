"""GET /jobs/{id}/events and ajob_events: a job's state changes and progress as one numbered
sequence, on both engines and across a move from Dramatiq to Temporal, resumed after a
disconnect without a gap or a repeat. Real workers; the job log on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from jobyard.dispatcher import ajob_events
from tests.api.conftest import ApiServer, on_engine
from tests.api.test_lifecycle import dispatch
from tests.engines import Engines

FINAL = ("succeeded", "failed", "dead", "cancelled")


def read_stream(
    api: ApiServer, job_id: str, last_id: int | None = None, stop_after: Any = None
) -> list[dict[str, Any]]:
    """SSE events until the stream ends (or `stop_after(event)` says stop: the client hangs
    up), each as its data with the SSE id and event name checked against it."""
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    events: list[dict[str, Any]] = []
    with api.client.stream("GET", f"/jobs/{job_id}/events", headers=headers, timeout=90) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in r.iter_lines():
            if line.startswith(":") or line.startswith("retry:"):
                continue
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
                continue
            if not fields:
                continue
            event = json.loads(fields["data"])
            assert int(fields["id"]) == event["seq"]
            assert fields["event"] == event["kind"]
            events.append(event)
            fields = {}
            if stop_after is not None and stop_after(event):
                break
    return events


def check_sequence(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
    assert events[-1]["kind"] == "state" and events[-1]["state"] in FINAL, events
    progress = [e["progress"] for e in events if e["kind"] == "progress"]
    assert progress == sorted(progress), progress


def collect_async(job_id: str) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [e.as_dict() async for e in ajob_events(job_id, timeout=60)]

    return asyncio.run(collect())


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_events_stream_resumes_after_a_disconnect(
    shared_api: ApiServer,
    shared_engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    engine: str,
) -> None:
    on_engine(shared_engines, monkeypatch, engine)
    job_id = dispatch(
        shared_api, "api.steps", {"marker_dir": str(tmp_path), "steps": 4, "seconds": 0.6}
    )

    # hang up after the first progress report, mid-run
    first = read_stream(shared_api, job_id, stop_after=lambda e: e["kind"] == "progress")
    assert first[-1]["kind"] == "progress" and first[-1]["progress"] < 1
    assert all(e["state"] != "succeeded" for e in first if e["kind"] == "state")
    rest = read_stream(shared_api, job_id, last_id=first[-1]["seq"])
    events = first + rest

    check_sequence(events)
    states = [e["state"] for e in events if e["kind"] == "state"]
    assert states[0] in ("queued", "running") and "running" in states, states
    assert states[-1] == "succeeded"
    assert {e["engine"] for e in events} == {engine}
    progress = [e["progress"] for e in events if e["kind"] == "progress"]
    assert progress[-1] == 1 and len(progress) >= 3, progress  # each step's report, live
    # the job is over and this client saw everything: 204 tells EventSource to stop
    done = shared_api.client.get(
        f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(len(events))}
    )
    assert done.status_code == 204
    # a late reader gets the whole story; the Python iterator tells the same one
    assert read_stream(shared_api, job_id) == events
    assert collect_async(job_id) == events


def test_events_of_a_job_moved_from_dramatiq_to_temporal_are_one_sequence(
    api: ApiServer, engines: Engines, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A job parks in ctx.sleep on Dramatiq; its worker dies; the rescue moves it to Temporal,
    which finishes it. A client disconnected in between resumes where it was."""
    monkeypatch.setenv("JOBYARD_RESCUE_INTERVAL", "0.5")
    on_engine(engines, monkeypatch, "dramatiq")
    job_id = dispatch(api, "api.nap", {"marker_dir": str(tmp_path), "nap": 5})
    before = read_stream(api, job_id, stop_after=lambda e: e.get("progress") == 0.5)
    assert engines.worker is not None
    engines.worker.signal_group(signal.SIGKILL)
    engines.worker.proc.wait()
    engines.start_temporal_worker()

    after = read_stream(api, job_id, last_id=before[-1]["seq"])
    events = before + after

    check_sequence(events)
    assert events[-1]["state"] == "succeeded" and events[-1]["engine"] == "temporal"
    engines_seen = [e["engine"] for e in events]
    moved = engines_seen.index("temporal")
    assert set(engines_seen[:moved]) == {"dramatiq"} and set(engines_seen[moved:]) == {"temporal"}
    progress = [(e["engine"], e["progress"]) for e in events if e["kind"] == "progress"]
    assert progress == [("dramatiq", 0.5), ("temporal", 1)], progress
    assert (tmp_path / "first").read_text().count("ran") == 1  # not run again on Temporal
    assert collect_async(job_id) == events


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_every_progress_report_and_state_is_an_event_however_fast(
    api: ApiServer, engines: Engines, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    """Twenty reports within 100 ms, a failure, a retry and twenty more: with the job log
    written every JOBYARD_JOB_LOG_INTERVAL (1 s here), each is still an event of its own, in
    order. (On Temporal a failure outside a step fails the job: no retry there.)"""
    monkeypatch.setenv("JOBYARD_JOB_LOG_INTERVAL", "1")
    on_engine(engines, monkeypatch, engine)
    retried = engine == "dramatiq"
    job_id = dispatch(api, "api.chatty", {"reports": 20, "fail_first": retried})
    events = read_stream(api, job_id)

    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    seen = [
        (e["kind"], e["state"] if e["kind"] == "state" else e["progress"], e.get("attempts"))
        for e in events
    ]
    if seen[0][:2] == ("state", "queued"):  # the API's own event, if it reached the log first
        seen = seen[1:]
    reports = [("progress", n / 20, None) for n in range(1, 21)]
    retry = [("state", "retrying", 1), ("state", "running", 2), *reports] if retried else []
    last = 2 if retried else 1
    assert seen == [("state", "running", 1), *reports, *retry, ("state", "succeeded", last)], seen
    assert {e["engine"] for e in events} == {engine}
    assert collect_async(job_id) == events


def test_events_need_a_token_and_a_known_job(api: ApiServer) -> None:
    assert api.anonymous.get("/jobs/whatever/events").status_code == 401
    assert api.client.get("/jobs/no-such-job/events").status_code == 404


def test_ajob_events_times_out_on_a_job_that_never_ends(api: ApiServer) -> None:
    start = time.monotonic()

    async def collect() -> list[Any]:
        return [e async for e in ajob_events("never-dispatched", timeout=0.5)]

    assert asyncio.run(collect()) == []
    assert time.monotonic() - start < 5

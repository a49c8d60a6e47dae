"""`ctx.wait_for_event` and `send_event` on the real engines: an event sent before the wait
(within JOBYARD_EVENT_LOOKBACK) or during it resumes the job, one that does not match does not,
a timeout ends the wait with None, one event resumes every job waiting for it, and a job never
takes the same event twice. The matching rules themselves: tests/test_event_matching.py."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from jobyard.dispatcher import get_job, send_event
from jobyard.dispatcher.events import read_events
from tests.support import wait_for

MODULES = "tests.jobs,tests.conformance_jobs,tests.children_jobs"
ENGINES = ["dramatiq", "temporal"]


@pytest.fixture
def on(engines, monkeypatch):
    monkeypatch.setenv("JOBYARD_JOB_MODULES", MODULES)
    return engines


def event_name() -> str:
    return f"payment.confirmed.{uuid.uuid4().hex[:8]}"


def count(directory: Path, step: str) -> int:
    path = directory / step
    return len(path.read_text().splitlines()) if path.exists() else 0


def waiting(on, engine, directory: Path, **payload):
    directory.mkdir()
    return on.dispatch(engine, "children.wait_event", {"marker_dir": str(directory), **payload})


@pytest.mark.parametrize("engine", ENGINES)
def test_an_event_sent_before_the_wait_resumes_it(on, engine, tmp_path):
    name = event_name()
    send_event(name, {"order_id": 41})
    send_event(name, {"order_id": 42, "n": 1})
    handle = waiting(on, engine, tmp_path / "job", event=name, match={"order_id": 42})
    status = on.wait(handle.job_id, timeout=60)
    assert (status.state, status.result) == ("succeeded", {"events": [{"order_id": 42, "n": 1}]})


@pytest.mark.parametrize("engine", ENGINES)
def test_a_waiting_job_resumes_on_a_matching_event_only(on, engine, tmp_path):
    name = event_name()
    directory = tmp_path / "job"
    handle = waiting(on, engine, directory, event=name, match={"order_id": 7})
    wait_for(lambda: get_job(handle.job_id).display_state == f"waiting for {name}", timeout=30)
    status = get_job(handle.job_id)
    assert (status.state, status.waiting_reason) == (
        "running",
        f'event {name} matching {{"order_id": 7}}',
    )
    send_event(name, {"order_id": 8})
    send_event(name, {"order_id": "7"})  # a string is not the number 7
    time.sleep(2)
    assert get_job(handle.job_id).state in ("queued", "running")
    send_event(name, {"order_id": 7, "paid": True})
    status = on.wait(handle.job_id, timeout=60)
    assert status.state == "succeeded", status
    assert status.result == {"events": [{"order_id": 7, "paid": True}]}
    assert (count(directory, "before"), count(directory, "after")) == (1, 1)
    # the wait is one event of the job's story, its looks (a dozen in those 2 s) none
    wait_for(lambda: [e.state for e in read_events(handle.job_id, 0)][-1:] == ["succeeded"], 10)
    story = read_events(handle.job_id, 0)
    told = [(e.kind, e.state, e.display_state) for e in story]
    assert told == [
        ("state", "queued", None), ("state", "running", None),
        ("state", "running", f"waiting for {name}"), ("state", "succeeded", None),
    ], told  # fmt: skip


@pytest.mark.parametrize("engine", ENGINES)
def test_a_wait_times_out_with_none(on, engine, tmp_path):
    began = time.monotonic()
    handle = waiting(on, engine, tmp_path / "job", event=event_name(), timeout=1.5)
    status = on.wait(handle.job_id, timeout=60)
    assert (status.state, status.result) == ("succeeded", {"events": [None]}), status
    assert time.monotonic() - began >= 1.5


@pytest.mark.parametrize("engine", ENGINES)
def test_one_event_resumes_every_waiter_and_no_job_takes_it_twice(on, engine, tmp_path):
    name = event_name()
    first = send_event(name, {"n": 1})
    twice = waiting(on, engine, tmp_path / "twice", event=name, times=2)
    once = waiting(on, engine, tmp_path / "once", event=name)
    assert on.wait(once.job_id, timeout=60).result == {"events": [{"n": 1}]}
    wait_for(lambda: count(tmp_path / "twice", "before") == 1, timeout=30)
    time.sleep(1)
    assert get_job(twice.job_id).state in ("queued", "running")  # event 1 taken: waits on
    second = send_event(name, {"n": 2})
    assert second > first
    status = on.wait(twice.job_id, timeout=60)
    assert (status.state, status.result) == ("succeeded", {"events": [{"n": 1}, {"n": 2}]})


def test_an_event_sent_while_the_waiting_jobs_worker_is_dead_resumes_it(on, tmp_path):
    name = event_name()
    directory = tmp_path / "job"
    handle = waiting(on, "dramatiq", directory, event=name, match={"order_id": 5})
    wait_for(lambda: get_job(handle.job_id).display_state == f"waiting for {name}", timeout=30)
    assert on.worker is not None
    on.worker.signal_group(signal.SIGKILL)
    on.worker.proc.wait()
    send_event(name, {"order_id": 5, "paid": True})
    on.start_worker()
    status = on.wait(handle.job_id, timeout=60)
    assert (status.state, status.engine) == ("succeeded", "dramatiq"), status
    assert status.result == {"events": [{"order_id": 5, "paid": True}]}
    assert (count(directory, "before"), count(directory, "after")) == (1, 1)

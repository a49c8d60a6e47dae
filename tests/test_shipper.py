"""The job log's shipper: Dramatiq workers mark changed jobs in Redis, the `jobyard worker`
supervisor copies them to the database. Real Redis, real SQLite and PostgreSQL, real processes."""

from __future__ import annotations

import signal
import threading
import uuid

import pytest
from sqlalchemy import select

from jobyard.dispatcher import get_job_record
from jobyard.dispatcher.metrics import render
from jobyard.job_engine.db import get_engine
from jobyard.job_engine.db.joblog import writer
from jobyard.job_engine.db.models import JobLog
from jobyard.queue import keys
from jobyard.queue.client import get_client
from jobyard.queue.messages import encode_job_message
from jobyard.queue.store import JobStore
from jobyard.worker.shipper import JobLogShipper
from tests.support import metric_samples, metric_value, wait_for

UNREACHABLE_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1"


@pytest.fixture
def store(jobyard_env) -> JobStore:
    """A worker's store: it marks every job it changes for the shipper."""
    store = JobStore(get_client(), log_changes=True)
    store.heartbeat("test-worker", "test-broker", ["default"])  # so enqueue finds a live worker
    return store


def _enqueue(store: JobStore, payload: dict | None = None) -> str:
    job_id = f"ship-{uuid.uuid4().hex[:10]}"
    message = encode_job_message("system.echo", "default", job_id, payload or {}, seq=0)
    reply = store.enqueue(
        job_id, "system.echo", "default", message.queue, message.redis_message_id,
        message.data, 60_000,
    )  # fmt: skip
    assert reply.status == "enqueued"
    return job_id


def _marked(store: JobStore) -> list[str]:
    prefix = keys.job_prefix()
    return [key.decode().removeprefix(prefix) for key, _ in store.changed_jobs(100)]


def test_a_finished_job_is_shipped_and_unmarked(store, job_log_database):
    job_id = _enqueue(store)
    assert _marked(store) == [], "dispatch logs its own event; only worker changes are marked"
    assert store.complete(job_id, 0, resume=False, result={"ok": 1}).status == "ok"
    assert _marked(store) == [job_id]

    JobLogShipper(store, 0.1, database_url=job_log_database).ship_all()

    record = get_job_record(job_id)
    assert (record.state, record.engine, record.result, record.attempts) == (
        "succeeded", "dramatiq", {"ok": 1}, 1,
    )  # fmt: skip
    assert record.enqueued_at <= record.started_at <= record.finished_at
    assert record.duration_ms is not None
    assert _marked(store) == []


def test_a_job_changed_while_shipping_stays_marked(store, job_log_database):
    job_id = _enqueue(store)
    store.start(job_id, "system.echo", 0, resume=False, rate=None)
    read = store.changed_jobs(100)
    store.finish(
        job_id, 0, "dead", error="RuntimeError: boom", error_class="RuntimeError",
        traceback="Traceback (most recent call last): boom", payload={"a": 1},
    )  # fmt: skip
    assert store.shipped(read) == 0, "the mark read before the change must not be removed"
    assert _marked(store) == [job_id]

    JobLogShipper(store, 0.1, database_url=job_log_database).ship_all()
    record = get_job_record(job_id)
    assert (record.state, record.error_class, record.payload) == ("dead", "RuntimeError", {"a": 1})
    assert record.error_message == "RuntimeError: boom"
    assert "boom" in (record.error_traceback or "")
    assert _marked(store) == []


def test_marks_wait_while_the_database_is_down(store, job_log_database):
    job_id = _enqueue(store)
    store.complete(job_id, 0, resume=False, result=1)
    down = JobLogShipper(store, 0.05, database_url=UNREACHABLE_DATABASE)
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises, nothing is lost
        down.ship_all()
    assert _marked(store) == [job_id]
    assert metric_value(metric_samples(render()[0].decode()), "jobyard_job_log_backlog") == 1
    store.client.delete(keys.job_log_shipper())  # the failed shipper's lease: as if it died

    stop = threading.Event()
    thread = JobLogShipper(store, 0.05, database_url=job_log_database).start(stop)
    try:
        wait_for(lambda: _marked(store) == [], timeout=10)
    finally:
        stop.set()
        thread.join(5)
    assert get_job_record(job_id).state == "succeeded"
    assert metric_value(metric_samples(render()[0].decode()), "jobyard_job_log_backlog") == 0


def test_a_row_the_database_refuses_does_not_hold_back_the_rest(store, job_log_db_url):
    refused, fine = _enqueue(store), _enqueue(store)
    store.complete(refused, 0, resume=False, result="a NUL \u0000 that JSONB refuses")
    store.complete(fine, 0, resume=False, result="fine")
    JobLogShipper(store, 0.1, database_url=job_log_db_url).ship_all()
    assert _marked(store) == []
    table = JobLog.__table__
    query = select(table.c.job_id, table.c.state, table.c.result)
    with get_engine(job_log_db_url).connect() as connection:
        rows = {r.job_id: (r.state, r.result) for r in connection.execute(query)}
    assert rows[fine] == ("succeeded", "fine")
    assert rows[refused] == ("succeeded", None), "kept, without the value refused"


def test_one_shipper_holds_the_lease(store, job_log_database):
    first = JobLogShipper(store, 0.1, database_url=job_log_database)
    second = JobLogShipper(store, 0.1, database_url=job_log_database)
    first.ship_all()  # takes the lease
    job_id = _enqueue(store)
    store.complete(job_id, 0, resume=False, result=1)
    second.ship_all()
    assert _marked(store) == [job_id], "the second shipper must wait for the lease"
    first.ship_all()
    assert _marked(store) == []


def test_a_job_handed_to_temporal_is_left_to_temporal(store, job_log_database):
    job_id = _enqueue(store)
    store.reschedule(job_id, 0, 1, "queued", "default.DQ", "rmid-2", b"{}")  # e.g. throttled
    assert store.handoff(job_id, "system.echo", "default").status == "claimed"
    JobLogShipper(store, 0.1, database_url=job_log_database).ship_all()
    assert _marked(store) == []
    assert get_job_record(job_id) is None, "Temporal's side writes the row of a job it took"


def test_the_log_of_a_finished_job_survives_its_worker_killed(engines, monkeypatch):
    """The outbox: a job's outcome is in Redis the moment it finishes, so a worker host killed
    before shipping loses none of its job log."""
    monkeypatch.setenv("JOBYARD_JOB_LOG_INTERVAL", "600")  # this worker never ships in time
    handle = engines.dispatch("dramatiq", "system.echo", {"kill": "me"})
    assert engines.wait(handle.job_id).state == "succeeded"
    writer().flush()  # this process's "queued" event
    assert get_job_record(handle.job_id).state == "queued"
    engines.worker.signal_group(signal.SIGKILL)
    engines.worker.proc.wait()

    monkeypatch.setenv("JOBYARD_JOB_LOG_INTERVAL", "0.1")
    engines.start_worker()
    record = wait_for(
        lambda: (r := get_job_record(handle.job_id)) and r.state == "succeeded" and r, timeout=15
    )
    assert record.result == {"kill": "me"}

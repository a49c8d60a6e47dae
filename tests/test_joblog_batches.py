"""The job log's batched "queued" (`JobLogWriter.record_queued`, what `dispatch_many` records):
the rows and events it writes are exactly those of one `record` per job, whether the job is new
to the log (the flush's insert-only fast path) or a worker's shipper wrote its row first (the
general path). Real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from jobyard.dispatcher import JobHandle, dispatch_many
from jobyard.job_engine.db import get_engine, joblog
from jobyard.job_engine.db.joblog import JobLogWriter, QueuedBatch, writer
from jobyard.job_engine.db.models import JobEvent, JobLog
from jobyard.queue.client import get_client
from jobyard.queue.store import JobStore

UNREACHABLE_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1"
PAYLOAD = {"to": "ünï@example.test", "n": 1, "tags": ["a", {"b": None}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> str:
    fixture = "job_log_database" if request.param == "sqlite" else "job_log_db_url"
    return request.getfixturevalue(fixture)


def _id(label: str) -> str:
    return f"batch-{label}-{uuid.uuid4().hex[:10]}"


def _text(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _queued_one_by_one(log: JobLogWriter, job_id: str, ts: float, payload: Any) -> None:
    """What `dispatched_event` records for a job Dramatiq took."""
    log.record(
        job_id, ts=ts, name="system.echo", queue="default", engine="dramatiq", state="queued",
        payload=payload, fallback_reason=None, enqueued_at=ts, run_at=None,
    )  # fmt: skip


def _batch(ts: float, *jobs: tuple[str, Any]) -> QueuedBatch:
    return QueuedBatch(ts, "system.echo", "default", "dramatiq", [(j, _text(p)) for j, p in jobs])


def _row(url: str, job_id: str) -> dict[str, Any]:
    table = JobLog.__table__
    with get_engine(url).connect() as connection:
        row = connection.execute(select(table).where(table.c.job_id == job_id)).mappings().one()
    return {key: value for key, value in row.items() if key != "job_id"}


def _events(url: str, job_id: str) -> list[dict[str, Any]]:
    table = JobEvent.__table__
    query = select(table).where(table.c.job_id == job_id).order_by(table.c.seq)
    with get_engine(url).connect() as connection:
        rows = connection.execute(query).mappings().all()
    return [{key: value for key, value in row.items() if key != "job_id"} for row in rows]


def _queued_both_ways(log: JobLogWriter, label: str, ts: float) -> tuple[str, str]:
    """A job queued in a batch and its twin queued by `record`, with the same payload."""
    batched, twin = _id(label), _id(f"{label}-twin")
    log.record_queued(_batch(ts, (batched, PAYLOAD)))
    _queued_one_by_one(log, twin, ts, PAYLOAD)
    return batched, twin


def _same_log(url: str, batched: str, one_by_one: str) -> None:
    assert _row(url, batched) == _row(url, one_by_one)
    assert _events(url, batched) == _events(url, one_by_one)


def test_a_new_job_gets_the_row_and_event_of_a_record(database):
    log = JobLogWriter(database)
    batched, twin = _queued_both_ways(log, "new", time.time())
    assert log.flush() == 2
    _same_log(database, batched, twin)
    row = _row(database, batched)
    assert (row["state"], row["engine"], row["events"], row["payload"]) == (
        "queued", "dramatiq", 1, PAYLOAD,
    )  # fmt: skip
    assert [(e["seq"], e["kind"], e["state"]) for e in _events(database, batched)] == [
        (1, "state", "queued")
    ]


def test_a_job_whose_row_exists_is_merged_as_a_record_would_be(database):
    """The worker's shipper wrote "running" and "succeeded" before the web process flushed the
    dispatch (and, first, their "queued"): the batched "queued" adds its sticky columns and no
    event, as `record`'s does."""
    log = JobLogWriter(database)
    ts = time.time()
    batched, twin, fresh = _id("exists"), _id("exists-twin"), _id("fresh")
    for job_id in (batched, twin):
        log.record(job_id, ts=ts + 0.01, name="system.echo", queue="default", engine="dramatiq",
                   state="running", attempts=1, started_at=ts + 0.01)  # fmt: skip
        log.record(job_id, ts=ts + 0.02, name="system.echo", queue="default", engine="dramatiq",
                   state="succeeded", attempts=1, finished_at=ts + 0.02,
                   result={"ok": 1})  # fmt: skip
    log.flush()
    log.record_queued(_batch(ts, (batched, PAYLOAD), (fresh, PAYLOAD)))
    _queued_one_by_one(log, twin, ts, PAYLOAD)
    assert log.flush() == 3
    _same_log(database, batched, twin)
    row = _row(database, batched)
    assert (row["state"], row["payload"], row["events"]) == ("succeeded", PAYLOAD, 3)
    # written with the first change, at its time (the writer knew no earlier one)
    first = _events(database, batched)[0]
    assert (first["seq"], first["state"], first["at"].timestamp()) == (
        1, "queued", pytest.approx(ts + 0.01, abs=1e-5),
    )  # fmt: skip
    assert _row(database, fresh)["state"] == "queued"


def test_a_later_event_of_a_batched_job_in_the_same_flush_follows_its_queued(database):
    log = JobLogWriter(database)
    ts = time.time()
    batched, twin = _queued_both_ways(log, "later", ts)
    for job_id in (batched, twin):
        log.record(job_id, ts=ts + 0.01, name="system.echo", queue="default", engine="dramatiq",
                   state="cancelled", finished_at=ts + 0.01)  # fmt: skip
    log.flush()
    _same_log(database, batched, twin)
    assert [(e["seq"], e["state"]) for e in _events(database, batched)] == [
        (1, "queued"), (2, "cancelled"),
    ]  # fmt: skip


def test_a_job_batched_twice_is_one_row_and_one_event(database):
    log = JobLogWriter(database)
    ts = time.time()
    batched, twin = _id("twice"), _id("twice-twin")
    log.record_queued(_batch(ts, (batched, PAYLOAD), (batched, PAYLOAD)))
    log.record_queued(_batch(ts, (batched, PAYLOAD)))
    for _ in range(3):
        _queued_one_by_one(log, twin, ts, PAYLOAD)
    log.flush()
    _same_log(database, batched, twin)
    assert len(_events(database, batched)) == 1


def test_batches_of_several_jobs_and_names(database):
    """Rows sorted for the insert and batches joined back by number: each job keeps its own
    payload, name and time."""
    log = JobLogWriter(database)
    ts = time.time()
    first = [(_id(f"a{i}"), {"n": i}) for i in range(30)]
    second = [(_id(f"b{i}"), [i, "x"]) for i in range(30)]
    log.record_queued(_batch(ts, *first))
    log.record_queued(
        QueuedBatch(ts + 1, "other.job", "q2", "dramatiq", [(j, _text(p)) for j, p in second])
    )
    assert log.flush() == 60
    for job_id, payload in first:
        row = _row(database, job_id)
        assert (row["name"], row["queue"], row["payload"]) == ("system.echo", "default", payload)
    for job_id, payload in second:
        row = _row(database, job_id)
        assert (row["name"], row["queue"], row["payload"]) == ("other.job", "q2", payload)
        assert row["enqueued_at"].timestamp() == pytest.approx(ts + 1, abs=1e-5)


def test_a_failed_flush_keeps_the_batch_for_the_next(database):
    log = JobLogWriter(UNREACHABLE_DATABASE)
    job_id = _id("kept")
    log.record_queued(_batch(time.time(), (job_id, PAYLOAD)))
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises for a refused connection
        log.flush()
    log.url = database
    assert log.flush() == 1
    assert _row(database, job_id)["state"] == "queued"


def test_dispatch_many_logs_each_job_it_started(jobyard_env, redis_server):
    """Through the dispatcher: each job Dramatiq took has its row, payload and first event."""
    JobStore(get_client()).heartbeat("test-worker", "test-broker", ["default"])
    results = dispatch_many([("system.echo", {"i": i}) for i in range(1200)])
    current = writer()
    assert current is not None
    current.flush()
    url = jobyard_env["DATABASE_URL"]
    for i, handle in enumerate(results):
        assert isinstance(handle, JobHandle) and handle.engine == "dramatiq"
        row = _row(url, handle.job_id)
        assert (row["state"], row["payload"], row["events"]) == ("queued", {"i": i}, 1)
        assert [e["state"] for e in _events(url, handle.job_id)] == ["queued"]


def test_jobs_new_to_the_log_skip_the_general_path(database, monkeypatch):
    """The point of the batch: no locking read, merge or judging per row for a new job."""
    log = JobLogWriter(database)
    jobs = [(_id(f"fast{i}"), {"n": i}) for i in range(50)]

    def general_path(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a new job took the general path")

    monkeypatch.setattr(joblog, "_upsert_in", general_path)
    log.record_queued(_batch(time.time(), *jobs))
    assert log.flush() == 50
    assert [_row(database, job_id)["payload"] for job_id, _ in jobs] == [p for _, p in jobs]

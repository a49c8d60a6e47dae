"""Every job's event history starts with its dispatch ("queued"), in the order things happened,
whichever process reached the job log first: the web process's batched "queued" or the worker's
"running" and "succeeded" (the Dramatiq outbox's shipper, the Temporal worker's own writer).
Real Redis, real `jobyard worker` and `jobyard temporal-worker` processes, real PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, text

from jobyard.dispatcher import JobHandle, dispatch_job, dispatch_many
from jobyard.job_engine.db import dispose_engines, get_engine
from jobyard.job_engine.db.joblog import JobLogWriter, reset_writer, writer
from jobyard.job_engine.db.models import JobEvent, JobLog
from jobyard.queue.client import get_client
from jobyard.queue.messages import encode_job_message
from jobyard.queue.store import JobStore
from jobyard.worker.shipper import JobLogShipper
from tests.support import migrated_pg_database, start_engines_patiently, wait_for

#: Jobs each way (one dispatch_job each, and in dispatch_many batches) on Dramatiq.
DRAMATIQ_JOBS = 400
TEMPORAL_JOBS = 20


@pytest.fixture
def order_db_url() -> Iterator[str]:
    """A PostgreSQL job log of this test's own: every job in it is one of the test's."""
    with migrated_pg_database("jobyard_test_order") as url:
        yield url
        dispose_engines(url)


def _histories(url: str) -> dict[str, list[dict[str, Any]]]:
    table = JobEvent.__table__
    query = select(table).order_by(table.c.job_id, table.c.seq)
    histories: dict[str, list[dict[str, Any]]] = {}
    with get_engine(url).connect() as connection:
        for event in connection.execute(query).mappings():
            histories.setdefault(event["job_id"], []).append(dict(event))
    return histories


def _count(url: str, sql: str) -> int:
    with get_engine(url).connect() as connection:
        return int(connection.execute(text(sql)).scalar_one())


def test_every_history_starts_with_queued_whichever_process_wrote_first(
    engines, order_db_url, monkeypatch
):
    """Half the jobs' "queued" is flushed as soon as they are dispatched (most reach the log
    before their worker's changes); the other half finish, and their workers' changes reach
    the log, before the web process flushes their "queued".
    Every job's first event is "queued", dated by its dispatch, and its events come in the
    order they happened."""
    monkeypatch.setenv("DATABASE_URL", order_db_url)
    start_engines_patiently(engines, queues="default", temporal=True)
    # This process's writer flushes only when told to: the race is decided by the test.
    monkeypatch.setenv("JOBYARD_JOB_LOG_INTERVAL", "600")
    reset_writer()
    web = writer()
    assert web is not None

    def dispatch_jobs(tag: str) -> list[JobHandle]:
        handles = [dispatch_job("system.echo", {"tag": tag, "i": i}) for i in range(DRAMATIQ_JOBS)]
        for result in dispatch_many(
            [("system.echo", {"tag": tag, "many": i}) for i in range(DRAMATIQ_JOBS)]
        ):
            assert isinstance(result, JobHandle), result
            handles.append(result)
        assert {handle.engine for handle in handles} == {"dramatiq"}
        handles += [
            engines.dispatch("temporal", "system.echo", {"tag": tag, "t": i})
            for i in range(TEMPORAL_JOBS)
        ]
        return handles

    def all_succeeded(ids: list[str]) -> bool:
        table = JobLog.__table__
        query = select(table.c.job_id).where(table.c.job_id.in_(ids), table.c.state == "succeeded")
        with get_engine(order_db_url).connect() as connection:
            return len(connection.execute(query).all()) == len(ids)

    web_first = dispatch_jobs("flushed-at-once")
    web.flush()
    worker_first = dispatch_jobs("worker-first")
    worker_first_ids = [handle.job_id for handle in worker_first]
    # Every job of the second half finished and is in the log, written by the workers alone.
    wait_for(lambda: all_succeeded(worker_first_ids), timeout=240, interval=0.5)
    web.flush()  # their "queued", late
    wait_for(lambda: all_succeeded([h.job_id for h in web_first]), timeout=240, interval=0.5)

    jobs = len(web_first) + len(worker_first)
    assert _count(order_db_url, "SELECT count(*) FROM job_log") == jobs
    not_queued_first = _count(
        order_db_url,
        "SELECT count(*) FROM job_log l LEFT JOIN job_events e"
        " ON e.job_id = l.job_id AND e.seq = 1"
        " WHERE e.job_id IS NULL OR e.kind <> 'state' OR e.state <> 'queued'",
    )
    print(f"\n{jobs} jobs, {len(worker_first)} logged by their worker first; "
          f"first event not queued: {not_queued_first}")  # fmt: skip
    assert not_queued_first == 0

    histories = _histories(order_db_url)
    rows = {}
    with get_engine(order_db_url).connect() as connection:
        for row in connection.execute(select(JobLog.__table__)).mappings():
            rows[row["job_id"]] = row
    shapes: Counter[tuple[str, tuple[str, ...]]] = Counter()
    for handle in [*web_first, *worker_first]:
        history = histories[handle.job_id]
        states = [e["state"] for e in history]
        # A Dramatiq job without steps starts and ends in one call: no "running" of its own.
        assert states in (["queued", "running", "succeeded"], ["queued", "succeeded"]), handle
        assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
        shapes[handle.engine, tuple(states)] += 1
        assert {e["engine"] for e in history} == {handle.engine}, handle
        times = [e["at"] for e in history]
        assert times == sorted(times), (handle, times)
        # Dated by the job's enqueue as the first writer knew it: the web process's dispatch,
        # the job's enqueue on Redis (whole ms) or its workflow's start. The row keeps the
        # earliest time known, which the dispatch call took before it sent the job.
        enqueued = rows[handle.job_id]["enqueued_at"]
        assert (times[0] - enqueued).total_seconds() > -1e-5, (handle, times, enqueued)
        assert rows[handle.job_id]["events"] == len(history)
    print(dict(shapes))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> str:
    fixture = "job_log_database" if request.param == "sqlite" else "job_log_db_url"
    return request.getfixturevalue(fixture)


def _run_on_a_worker(store: JobStore) -> tuple[str, float]:
    """A job enqueued, started and finished by a worker's store: its changes wait in the
    outbox. Returns its id and the time its dispatch began."""
    job_id = f"order-{uuid.uuid4().hex[:10]}"
    began = time.time()
    message = encode_job_message("system.echo", "default", job_id, {}, seq=0)
    reply = store.enqueue(
        job_id, "system.echo", "default", message.queue, message.redis_message_id,
        message.data, 60_000,
    )  # fmt: skip
    assert reply.status == "enqueued"
    assert store.start(job_id, "system.echo", 0, resume=False).status == "ok"
    store.record_progress(job_id, 0, "0.5")
    store.finish(job_id, 0, "succeeded", result={"ok": 1})
    return job_id, began


def _record_dispatch(log: JobLogWriter, job_id: str, began: float) -> None:
    """What the web process's `dispatched_event` records."""
    log.record(job_id, ts=began, name="system.echo", queue="default", engine="dramatiq",
               state="queued", payload={}, enqueued_at=began)  # fmt: skip


def test_the_same_history_whichever_process_wrote_first(jobyard_env, database):
    """One job's dispatch is logged before its worker's changes are shipped, the other's after:
    their histories are the same, each starting with its dispatch."""
    store = JobStore(get_client(), log_changes=True)
    store.heartbeat("test-worker", "test-broker", ["default"])
    web = JobLogWriter(database, interval=60)
    shipper = JobLogShipper(store, 0.1, database_url=database)

    first, first_began = _run_on_a_worker(store)
    _record_dispatch(web, first, first_began)
    web.flush()
    shipper.ship_all()

    late, late_began = _run_on_a_worker(store)
    shipper.ship_all()
    _record_dispatch(web, late, late_began)
    web.flush()

    histories = {}
    for job_id, began in ((first, first_began), (late, late_began)):
        events = _histories_of(database, job_id)
        # the dispatch's own time, or the job's enqueue on Redis's clock (whole milliseconds)
        assert began - 1e-3 <= events[0]["at"].timestamp() < events[1]["at"].timestamp()
        times = [e["at"] for e in events]
        assert times == sorted(times)
        histories[job_id] = [
            {k: v for k, v in e.items() if k not in ("job_id", "at")} for e in events
        ]
    assert histories[late] == histories[first]
    assert [(e["seq"], e["kind"], e["state"]) for e in histories[late]] == [
        (1, "state", "queued"), (2, "state", "running"), (3, "progress", None),
        (4, "state", "succeeded"),
    ]  # fmt: skip


def _histories_of(url: str, job_id: str) -> list[dict[str, Any]]:
    table = JobEvent.__table__
    query = select(table).where(table.c.job_id == job_id).order_by(table.c.seq)
    with get_engine(url).connect() as connection:
        return [dict(e) for e in connection.execute(query).mappings()]

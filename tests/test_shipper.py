"""The job log's shipper: Dramatiq workers append each change of a job to an outbox in Redis,
the `jobyard worker` supervisor writes them to the database, every change one event, exactly
once. Real Redis, real SQLite and PostgreSQL, real processes."""

from __future__ import annotations

import gc
import signal
import threading
import uuid

import pytest
from sqlalchemy import select

from jobyard.dispatcher import get_job_record
from jobyard.dispatcher.metrics import render
from jobyard.job_engine.db import get_engine, joblog
from jobyard.job_engine.db.joblog import JobLogWriter, writer
from jobyard.job_engine.db.models import JobEvent, JobLog
from jobyard.queue import keys
from jobyard.queue.client import get_client
from jobyard.queue.messages import encode_job_message
from jobyard.queue.store import JobStore
from jobyard.worker.shipper import BATCH, JobLogShipper, to_event
from tests.support import metric_samples, metric_value, wait_for

UNREACHABLE_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1"


@pytest.fixture
def store(jobyard_env) -> JobStore:
    """A worker's store: it logs every change it makes to a job for the shipper."""
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
    """The jobs of the entries waiting in the outbox, in order."""
    return [to_event(entry_id, entry)[2] for entry_id, entry in store.job_log_entries(100)]


def _events(url: str, job_id: str) -> list[tuple]:
    """The job's events as (kind, state or progress, engine, attempts), in order."""
    table = JobEvent.__table__
    query = select(table).where(table.c.job_id == job_id).order_by(table.c.seq)
    with get_engine(url).connect() as connection:
        rows = connection.execute(query).mappings().all()
    assert [row["seq"] for row in rows] == list(range(1, len(rows) + 1))
    return [
        (row["kind"], row["state"] if row["kind"] == "state" else row["progress"], row["engine"],
         row["attempts"])
        for row in rows
    ]  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> str:
    """The job log on either database."""
    fixture = "job_log_database" if request.param == "sqlite" else "job_log_db_url"
    return request.getfixturevalue(fixture)


def test_a_finished_job_is_shipped_and_trimmed(store, job_log_database):
    job_id = _enqueue(store)
    assert _marked(store) == [], "dispatch logs its own event; only worker changes are logged"
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


def test_the_garbage_collector_is_paused_only_while_a_batch_is_written(
    store, job_log_database, monkeypatch
):
    """Each entry makes a row and an event, alive until the batch is written: the collector
    would traverse the heap again and again for no cycle (see jobyard.job_engine.collector)."""
    ship = joblog.ship
    seen: list[bool] = []

    def watched(events, url=None):
        seen.append(gc.isenabled())
        return ship(events, url)

    monkeypatch.setattr(joblog, "ship", watched)
    job_id = _enqueue(store)
    store.complete(job_id, 0, resume=False, result={"ok": 1})
    assert gc.isenabled()
    JobLogShipper(store, 0.1, database_url=job_log_database).ship_all()
    assert seen == [False] and gc.isenabled()
    assert get_job_record(job_id).state == "succeeded"


def test_a_backlog_is_shipped_in_bounded_batches(store, job_log_db_url, monkeypatch):
    """A backlog (the database away, a lease taken over) goes in transactions of at most
    BATCH entries, in order: the supervisor keeps the memory of its largest batch (Python's
    allocator keeps the arenas a batch fragmented), so the batch bounds its RSS for good
    (issue 29's soak: a witness worker +22 MB after 5,000-entry batches)."""
    ship = joblog.ship
    sizes: list[int] = []

    def watched(events, url=None):
        sizes.append(len(events))
        return ship(events, url)

    monkeypatch.setattr(joblog, "ship", watched)
    jobs = [_enqueue(store) for _ in range(BATCH + 200)]
    for job_id in jobs:
        store.complete(job_id, 0, resume=False, result={"ok": 1})
    JobLogShipper(store, 0.1, database_url=job_log_db_url).ship_all()
    assert sizes == [BATCH, 200] and BATCH <= 1000
    table = JobLog.__table__
    with get_engine(job_log_db_url).connect() as connection:
        states = connection.execute(select(table.c.state).where(table.c.job_id.in_(jobs))).scalars()
        assert sorted(states) == ["succeeded"] * len(jobs)
    assert _marked(store) == []


def test_a_change_made_while_shipping_stays_in_the_outbox(store, job_log_database):
    job_id = _enqueue(store)
    store.start(job_id, "system.echo", 0, resume=False)
    read = store.job_log_entries(100)
    store.finish(
        job_id, 0, "dead", error="RuntimeError: boom", error_class="RuntimeError",
        traceback="Traceback (most recent call last): boom", payload={"a": 1},
    )  # fmt: skip
    assert store.job_log_shipped(read[-1][0]) == 1, "only the entry read is trimmed"
    assert _marked(store) == [job_id]

    JobLogShipper(store, 0.1, database_url=job_log_database).ship_all()
    record = get_job_record(job_id)
    assert (record.state, record.error_class, record.payload) == ("dead", "RuntimeError", {"a": 1})
    assert record.error_message == "RuntimeError: boom"
    assert "boom" in (record.error_traceback or "")
    assert _marked(store) == []


def test_every_change_is_one_event_in_order(store, database):
    """Twenty progress reports, a retry, a durable sleep and the end, all within one shipping
    interval, after the web process logged "queued": each its own event, in order."""
    job_id = _enqueue(store)
    queued = JobLogWriter(database, interval=60)
    queued.record(job_id, name="system.echo", queue="default", engine="dramatiq", state="queued")
    queued.flush()
    store.start(job_id, "system.echo", 0, resume=False)
    for n in range(1, 11):
        store.record_progress(job_id, 0, str(n / 10))
    store.reschedule(job_id, 0, 1, "retrying", "default.DQ", "m2", b"{}", run_at_ms=1)
    store.start(job_id, "system.echo", 1, resume=False)
    for n in range(1, 11):
        store.record_progress(job_id, 1, str(n / 10))
    store.record_progress(job_id, 1, "1.0")  # the same value again is a report of its own
    store.reschedule(job_id, 1, 2, "running", "default.DQ", "m3", b"{}", run_at_ms=2)  # sleeps
    store.start(job_id, "system.echo", 2, resume=True)
    store.finish(job_id, 2, "succeeded", result={"ok": True})

    JobLogShipper(store, 0.1, database_url=database).ship_all()

    tenths = [("progress", n / 10, "dramatiq", None) for n in range(1, 11)]
    assert _events(database, job_id) == [
        ("state", "queued", "dramatiq", 0),
        ("state", "running", "dramatiq", 1),
        *tenths,
        ("state", "retrying", "dramatiq", 1),
        ("state", "running", "dramatiq", 2),
        *tenths,
        ("progress", 1.0, "dramatiq", None),
        ("state", "running", "dramatiq", 2),  # parked in a durable sleep: its wake time is set
        ("state", "running", "dramatiq", 2),  # woken
        ("state", "succeeded", "dramatiq", 2),
    ]
    table = JobEvent.__table__
    with get_engine(database).connect() as connection:
        run_at = connection.execute(
            select(table.c.run_at).where(table.c.job_id == job_id).order_by(table.c.seq)
        ).scalars().all()  # fmt: skip
    assert [t is not None for t in run_at] == [False] * 12 + [True] + [False] * 12 + [
        True,
        False,
        False,
    ]
    assert _marked(store) == []


def test_a_batch_shipped_again_after_a_crash_adds_no_event(store, database):
    """The shipper dies after its commit, before trimming the outbox: the next one reads the
    same entries again (in a batch cut elsewhere) and adds only the new ones."""
    job_id = _enqueue(store)
    store.start(job_id, "system.echo", 0, resume=False)
    for n in range(1, 5):
        store.record_progress(job_id, 0, str(n))
    crashed = JobLogShipper(store, 0.1, database_url=database, batch=3)
    assert crashed.ship_batch(trim=False) == 3  # running, 1, 2 written; nothing trimmed
    # No web process logged the dispatch: the shipper writes it first, from the outbox.
    assert _events(database, job_id) == [
        ("state", "queued", "dramatiq", 0), ("state", "running", "dramatiq", 1),
        ("progress", 1, "dramatiq", None), ("progress", 2, "dramatiq", None),
    ]  # fmt: skip
    store.finish(job_id, 0, "succeeded", result=1)
    assert len(_marked(store)) == 6

    store.client.delete(keys.job_log_shipper())  # the dead shipper's lease, expired
    JobLogShipper(store, 0.1, database_url=database).ship_all()
    assert _events(database, job_id) == [
        ("state", "queued", "dramatiq", 0),
        ("state", "running", "dramatiq", 1),
        *[("progress", n, "dramatiq", None) for n in range(1, 5)],
        ("state", "succeeded", "dramatiq", 1),
    ]
    assert _marked(store) == []


def test_any_job_id_finds_its_own_row_when_shipped_again(jobyard_env, database):
    """The ids to lock travel as one value (PostgreSQL: a JSON array): an id with a quote, a
    backslash, a comma, braces or spelling NULL still finds its own row, so a batch shipped
    again adds nothing, and a later change is numbered after the first."""
    suffix = uuid.uuid4().hex[:8]
    ids = [f'q"uote-{suffix}', f"back\\slash-{suffix}", f"com,ma-{suffix}", f"{{brace}}-{suffix}",
           "NULL", f"sp ace-ünï-{suffix}"]  # fmt: skip
    running = {"state": "running", "name": "system.echo", "queue": "default", "attempts": 1}
    first = [(1, 1_790_000_000.0, job_id, {"engine": "dramatiq", **running}) for job_id in ids]
    assert joblog.ship(first, database) == len(ids)
    assert joblog.ship(first, database) == 0
    done = {"engine": "dramatiq", "state": "succeeded", "finished_at": 1_790_000_001.0}
    assert joblog.ship([(2, 1_790_000_001.0, job_id, done) for job_id in ids], database) == 6
    for job_id in ids:
        assert _events(database, job_id) == [
            ("state", "queued", "dramatiq", 0), ("state", "running", "dramatiq", 1),
            ("state", "succeeded", "dramatiq", 1),
        ], job_id  # fmt: skip


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


@pytest.mark.parametrize(
    "refused_value",
    ["a NUL \u0000 that JSONB refuses", "a lone \ud800 surrogate, refused by JSONB and pydantic"],
)
def test_a_row_the_database_refuses_does_not_hold_back_the_rest(
    store, job_log_db_url, refused_value
):
    refused, fine = _enqueue(store), _enqueue(store)
    store.complete(refused, 0, resume=False, result=refused_value)
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


def test_a_job_handed_to_temporal_keeps_what_dramatiq_did_before(store, job_log_database):
    job_id = _enqueue(store)
    store.reschedule(job_id, 0, 1, "queued", "default.DQ", "rmid-2", b"{}")  # e.g. throttled
    assert store.handoff(job_id, "system.echo", "default").status == "claimed"
    assert store.start(job_id, "system.echo", 1, resume=False).status == "lost"
    JobLogShipper(store, 0.1, database_url=job_log_database).ship_all()
    assert _marked(store) == []
    # Temporal's side writes the rest of the job's life.
    assert _events(job_log_database, job_id) == [("state", "queued", "dramatiq", 0)]


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


def _ended_jobs_batch(suffix: str, queue: str) -> tuple[list[joblog.OutboxEvent], list[str]]:
    """Rows as a web process and earlier batches left them, then one outbox batch of endings
    and other changes, for jobs in every case `ship` tells apart. Returns (batch, job ids)."""
    ids = {case: f"{case}-{suffix}" for case in (
        "done", "dead", "no_row", "already_final", "newer_row", "several", "cancelled",
    )}  # fmt: skip
    t = 1_790_000_000.0
    queued = JobLogWriter(None, interval=60)
    for case, job_id in ids.items():
        if case != "no_row":
            queued.record(job_id, ts=t, name="system.echo", queue=queue, engine="dramatiq",
                          state="queued", payload={"case": case}, enqueued_at=t)  # fmt: skip
    queued.record(ids["already_final"], ts=t + 5, name="system.echo", state="cancelled")
    queued.record(ids["newer_row"], ts=t + 50, name="system.echo", state="retrying")
    common = {"engine": "dramatiq", "name": "system.echo", "queue": queue,
              "enqueued_at": t, "started_at": t + 1}  # fmt: skip
    ended = {**common, "attempts": 1, "finished_at": t + 3, "duration_ms": 2000}
    batch: list[joblog.OutboxEvent] = [
        (10, t + 3, ids["done"], {**ended, "state": "succeeded", "result": {"ok": 1}}),
        (11, t + 3, ids["dead"], {**ended, "attempts": 3, "state": "dead",
                                  "error_message": "ValueError: no", "error_class": "ValueError",
                                  "error_traceback": "Traceback...", "payload": {"n": 1}}),
        (12, t + 3, ids["no_row"], {**ended, "state": "succeeded", "result": 2}),
        (13, t + 3, ids["already_final"], {**ended, "state": "succeeded", "result": 3}),
        (14, t + 3, ids["newer_row"], {**ended, "state": "failed", "error_message": "late"}),
        (15, t + 1, ids["several"], {**common, "attempts": 1, "state": "running"}),
        (16, t + 2, ids["several"], {"engine": "dramatiq", "progress": 0.5,
                                     joblog.REPORTED: True}),
        (17, t + 3, ids["several"], {**ended, "state": "succeeded", "result": 4}),
        (18, t + 4, ids["cancelled"], {**ended, "state": "cancelled", "finished_at": t + 4}),
    ]  # fmt: skip
    return batch, [queued, *ids.values()]  # type: ignore[list-item]


def _log_of(url: str, ids: list[str], suffix: str) -> tuple[list, list, list]:
    """The jobs' rows and events (ids without the suffix) and their queue's job_stats."""
    from jobyard.job_engine.db.models import JobStat

    log_t, events_t, stats_t = JobLog.__table__, JobEvent.__table__, JobStat.__table__
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            select(log_t).where(log_t.c.job_id.in_(ids)).order_by(log_t.c.job_id)
        ).mappings().all()  # fmt: skip
        events = connection.execute(
            select(events_t).where(events_t.c.job_id.in_(ids))
            .order_by(events_t.c.job_id, events_t.c.seq)
        ).mappings().all()  # fmt: skip
        queue = rows[0]["queue"]
        stats = connection.execute(
            select(stats_t).where(stats_t.c.queue == queue).order_by(stats_t.c.span)
        ).mappings().all()  # fmt: skip

    def plain(row) -> dict:
        kept = {k: v for k, v in row.items() if k != "queue"}
        if "job_id" in kept:
            kept["job_id"] = kept["job_id"].removesuffix(f"-{suffix}")
        return kept

    return [plain(r) for r in rows], [plain(e) for e in events], [plain(s) for s in stats]


def test_endings_in_one_update_write_what_the_general_path_writes(job_log_db_url, monkeypatch):
    """PostgreSQL ships most endings in one UPDATE; every row, event and job_stats count must
    be what the general path (lock, merge, upsert) writes for the same batch, and a batch
    shipped again adds nothing either way."""
    written, by_update = {}, []
    ship_endings = joblog._ship_endings
    for path in ("endings", "general"):
        suffix, queue = uuid.uuid4().hex[:8], f"q-{path}-{uuid.uuid4().hex[:6]}"
        batch, (queued, *ids) = _ended_jobs_batch(suffix, queue)
        queued.url = job_log_db_url
        queued.flush()
        with monkeypatch.context() as patched:
            if path == "general":
                patched.setattr(joblog, "_endings", lambda events: [])
            else:
                patched.setattr(joblog, "_ship_endings", lambda connection, endings: (
                    by_update.append(ship_endings(connection, endings)) or by_update[-1]
                ))  # fmt: skip
            assert joblog.ship(batch, job_log_db_url) == len(batch)
            assert joblog.ship(batch, job_log_db_url) == 0
        written[path] = _log_of(job_log_db_url, ids, suffix)
    rows, events, stats = written["endings"]
    assert (rows, events, stats) == written["general"]
    assert {r["job_id"]: r["state"] for r in rows} == {
        "already_final": "cancelled", "cancelled": "cancelled", "dead": "dead",
        "done": "succeeded", "newer_row": "retrying", "no_row": "succeeded",
        "several": "succeeded",
    }  # fmt: skip
    # Minutes and hours: six jobs ended (one of them when the web process cancelled it).
    assert sum(s["finished"] for s in stats) == 2 * 6
    ended_by_update = {job_id.split("-")[0] for job_id in by_update[0]}
    assert ended_by_update == {"done", "dead", "cancelled"} and by_update[1] == set()

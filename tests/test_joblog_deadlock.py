"""A job log write that PostgreSQL aborts to break a deadlock is tried again at once, not
failed (and kept for the next interval, logged as a failed flush). Real PostgreSQL: another
transaction holds one row of a batch, the flush locks the batch's rows in order and waits for
it, then that transaction asks for a row the flush holds."""

from __future__ import annotations

import logging
import threading
import time
import uuid

from sqlalchemy import create_engine, text

from jobyard.job_engine.db import get_engine
from jobyard.job_engine.db.joblog import JobLogWriter
from tests.support import wait_for

LOCK_ONE = "SELECT job_id FROM job_log WHERE job_id = :id FOR UPDATE"


def _queued(log: JobLogWriter, job_id: str, ts: float) -> None:
    log.record(
        job_id, ts=ts, name="system.echo", queue="default", engine="dramatiq", state="queued",
        payload={"n": 1}, enqueued_at=ts,
    )  # fmt: skip


def _flush_waiting_for_a_lock(url: str, other_pid: int) -> bool:
    with get_engine(url).connect() as connection:
        waiting = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> :other AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
            ),
            {"other": other_pid},
        ).scalar_one()
    return bool(waiting)


def test_a_flush_chosen_to_break_a_deadlock_is_written_on_its_next_try(job_log_db_url, caplog):
    url = job_log_db_url
    first, second = sorted(f"deadlock-{uuid.uuid4().hex[:10]}-{n}" for n in (1, 2))
    log = JobLogWriter(url, interval=3600)  # flushed by the test only
    now = time.time()
    for job_id in (first, second):
        _queued(log, job_id, now)
    log.flush()

    for job_id in (first, second):  # both start: the flush locks first, then second
        log.record(job_id, ts=now + 1, state="running", engine="dramatiq", attempts=1)
    other = create_engine(url).connect()
    transaction = other.begin()
    other_pid = other.execute(text("SELECT pg_backend_pid()")).scalar_one()
    other.execute(text(LOCK_ONE), {"id": second})
    outcome: dict[str, object] = {}

    def flush() -> None:
        try:
            outcome["rows"] = log.flush()
        except Exception as exc:  # what the old flush raised: DeadlockDetected
            outcome["error"] = exc

    caplog.set_level(logging.INFO, logger="jobyard.joblog")
    flushing = threading.Thread(target=flush)
    flushing.start()
    try:
        wait_for(lambda: _flush_waiting_for_a_lock(url, other_pid), timeout=10)
        # The flush holds `first` and waits for `second`: asking for `first` closes the cycle.
        # The flush waited first, so its deadlock check runs first and aborts it; this goes on.
        other.execute(text(LOCK_ONE), {"id": first})
        transaction.commit()
    finally:
        other.close()
        flushing.join(timeout=30)

    assert "error" not in outcome, outcome.get("error")
    assert outcome["rows"] == 2
    assert any("chosen to break a deadlock" in r.getMessage() for r in caplog.records)
    with get_engine(url).connect() as connection:
        states = dict(
            connection.execute(
                text("SELECT job_id, state FROM job_log WHERE job_id IN (:a, :b)"),
                {"a": first, "b": second},
            ).all()
        )
        seqs = connection.execute(
            text("SELECT job_id, seq FROM job_events WHERE job_id IN (:a, :b) ORDER BY 1, 2"),
            {"a": first, "b": second},
        ).all()
    assert states == {first: "running", second: "running"}
    assert seqs == [(first, 1), (first, 2), (second, 1), (second, 2)]

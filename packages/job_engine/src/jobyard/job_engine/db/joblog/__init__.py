"""The job log: every job's life in the database, written off the hot path.

    from jobyard.job_engine.db import joblog
    joblog.record(job_id, state="running", ...)   # returns at once; written within an interval

`record(job_id, name, state=..., ...)` appends an event to the process's writer
(joblog/writer.py): a background thread merges the buffered events per job and upserts them
every `JOBYARD_JOB_LOG_INTERVAL` seconds. Events from different processes can arrive out of
order (a web process flushes "queued" after the worker flushed "succeeded"), so a row's state
only moves to an event at least as new as the one it holds (`state_at`; joblog/merge.py).

Dramatiq workers do not call `record`: each Lua call that changes a job appends the change to
an outbox in Redis, and the `jobyard worker` supervisor's shipper writes those here with `ship`
(jobyard/worker/shipper.py), exactly once: a job's row keeps the id of the last outbox entry
written (`outbox_id`), checked in the same transaction (joblog/outbox.py).

Every write also appends the changes it makes to a row to `job_events` (a new state, engine,
attempt or wake time; a progress report), numbered per job from `job_log.events` in the same
transaction, with the row locked: whichever process writes, on whichever engine, a job's events
form one gap-free sequence, which GET /jobs/{id}/events streams. The price is one locking read
per batch and round, never work on a worker's job thread. Several changes of one job in a batch
are written in rounds (`merge_rounds`), so each state change and each progress report a writer
recorded becomes an event of its own, in order, however fast they came (joblog/upsert.py).

A job's history starts with its dispatch, whichever process writes first: the web process
flushes "queued" every interval, and a worker's "running" may reach the log before it. The
writer of a job's first change that is not its dispatch writes a "queued" first, at the job's
enqueue time as it knows it (`dispatch_event`); the dispatch's own record, when it comes, then
merges into the row and adds no event. Numbers follow the order things happened, so a reader
following a job never sees a later event before its dispatch.

The modules: writer.py (the buffer and its thread), queued.py (dispatch_many's batched
"queued"), merge.py (the merge rules), upsert.py (the general path), outbox.py (the Dramatiq
outbox's changes), stats.py (job_stats), sql.py (the statements, for PostgreSQL and SQLite).
This package holds the entry points, each one transaction, and the process's writer.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection

from jobyard.job_engine import env
from jobyard.job_engine.db import get_engine
from jobyard.job_engine.db.joblog.merge import (
    ANNOUNCED,
    COLUMNS,
    LATEST,
    PARTS,
    REPORTED,
    STICKY,
    TIMESTAMPS,
    changes_of,
    dispatch_event,
    merge,
    merge_rounds,
    segments,
)
from jobyard.job_engine.db.joblog.outbox import (
    ENDING_FIELDS,
    NOT_IN_ENDINGS,
    OutboxEvent,
    ship_changes,
)

# `ship` takes the endings' UPDATE (on PostgreSQL) and `write_queued` the general path by these
# names, looked up here: a test replaces them here to take one path or the other.
from jobyard.job_engine.db.joblog.outbox import endings as _endings
from jobyard.job_engine.db.joblog.outbox import ship_endings as _ship_endings
from jobyard.job_engine.db.joblog.queued import QueuedBatch, insert_queued
from jobyard.job_engine.db.joblog.retry import retrying_deadlocks
from jobyard.job_engine.db.joblog.sql import JUDGED
from jobyard.job_engine.db.joblog.upsert import upsert_in
from jobyard.job_engine.db.joblog.upsert import upsert_in as _upsert_in
from jobyard.job_engine.db.joblog.writer import MAX_BUFFER, REPEAT_LOG_SECONDS, JobLogWriter

__all__ = [
    "ANNOUNCED",
    "COLUMNS",
    "ENDING_FIELDS",
    "JUDGED",
    "LATEST",
    "MAX_BUFFER",
    "NOT_IN_ENDINGS",
    "PARTS",
    "REPEAT_LOG_SECONDS",
    "REPORTED",
    "STICKY",
    "TIMESTAMPS",
    "JobLogWriter",
    "OutboxEvent",
    "QueuedBatch",
    "changes_of",
    "dispatch_event",
    "enabled",
    "merge",
    "merge_rounds",
    "record",
    "reset_writer",
    "segments",
    "ship",
    "upsert",
    "upsert_rounds",
    "write_queued",
    "write_queued_in",
    "writer",
]

log = logging.getLogger("jobyard.joblog")


def ship(events: list[OutboxEvent], url: str | None = None) -> int:
    """Writes changes from the Dramatiq outbox, in one transaction: the jobs' rows are locked,
    the events a batch wrote before (at or below the job's `outbox_id`: the shipper died
    before trimming them) are skipped, the rest are merged per round (`merge_rounds`) and
    upserted, and each job's `outbox_id` moves to its last event. Returns how many were new.
    On PostgreSQL most endings first go in one UPDATE with the same rules (`ship_endings`)."""
    return retrying_deadlocks(lambda: _ship(events, url))


def _ship(events: list[OutboxEvent], url: str | None) -> int:
    engine = get_engine(url)
    with engine.begin() as connection:
        ended = 0
        if connection.dialect.name == "postgresql":
            ended_jobs = _ship_endings(connection, _endings(events))
            if ended_jobs:
                events = [event for event in events if event[2] not in ended_jobs]
                ended = len(ended_jobs)
            if not events:
                return ended
        return ended + ship_changes(connection, events)


def upsert(rows: list[dict[str, Any]], url: str | None = None) -> None:
    """One upsert statement per batch, plus the batch's events (see the module docstring). On
    PostgreSQL the rows travel as a single JSON array (jsonb_populate_recordset; absent keys
    are NULL), which costs a fraction of binding every row's parameters."""
    upsert_rounds([rows], url)


def upsert_rounds(rounds: list[list[dict[str, Any]]], url: str | None = None) -> None:
    """Upsert each round of rows (one row per job in a round) in turn, in one transaction."""
    retrying_deadlocks(lambda: _upsert_rounds(rounds, url))


def _upsert_rounds(rounds: list[list[dict[str, Any]]], url: str | None) -> None:
    engine = get_engine(url)
    with engine.begin() as connection:
        for rows in rounds:
            if rows:
                upsert_in(connection, rows)


def write_queued(
    batches: list[QueuedBatch],
    events: list[tuple[float, str, dict[str, Any]]],
    url: str | None = None,
) -> int:
    """Writes `batches` and `events` in one transaction; returns how many rows were upserted.
    The rows of batched jobs new to the log are inserted with their "queued" event in one
    statement (`insert_queued`): no row to lock, merge or judge, so none of the general path's
    per-row work. The rest (a job whose row a worker's shipper wrote first, a job batched twice)
    and `events` then take the general path, as `record`'s events would: what ends up in the
    log is the same either way."""
    # A copy each try: write_queued_in adds the batches' leftovers to the events it is given.
    return retrying_deadlocks(lambda: _write_queued(batches, list(events), url))


def _write_queued(
    batches: list[QueuedBatch], events: list[tuple[float, str, dict[str, Any]]], url: str | None
) -> int:
    engine = get_engine(url)
    with engine.begin() as connection:
        return write_queued_in(connection, batches, events)


def write_queued_in(
    connection: Connection,
    batches: list[QueuedBatch],
    events: list[tuple[float, str, dict[str, Any]]],
) -> int:
    """`write_queued` in the caller's transaction (the dispatch outbox's relay writes the jobs
    it sent in the transaction that deletes their outbox rows)."""
    inserted, left = insert_queued(connection, batches)
    for batch in left:
        events.extend(batch.events())
    rounds = merge_rounds(events) if events else []
    for rows in rounds:
        if rows:
            _upsert_in(connection, rows)
    return inserted + sum(len(rows) for rows in rounds)


_writer: JobLogWriter | None = None
_enabled: bool | None = None


def enabled() -> bool:
    """JOBYARD_JOB_LOG, read once per process (reset_writer reads it again)."""
    global _enabled
    if _enabled is None:
        _enabled = env.get_bool(env.JOB_LOG)
    return _enabled


def writer() -> JobLogWriter | None:
    """The process's writer, or None when the job log is switched off (JOBYARD_JOB_LOG=false)."""
    global _writer
    if not enabled():
        return None
    if _writer is None:
        _writer = JobLogWriter()
    return _writer


def record(job_id: str, **fields: Any) -> None:
    current = writer()
    if current is not None:
        current.record(job_id, **fields)


def reset_writer() -> None:
    global _writer, _enabled
    _enabled = None
    if _writer is not None:
        try:
            _writer.flush()
        except Exception as exc:
            log.warning("job log flush failed on reset: %s", exc)
    _writer = None

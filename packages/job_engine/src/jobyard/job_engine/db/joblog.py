"""The job log: every job's life in the database, written off the hot path.

`record(job_id, name, state=..., ...)` appends an event to an in-process buffer (a deque
append: no I/O on the dispatch path or in the worker loop; times stay unix seconds until the
flush turns them into datetimes); a background thread merges the
buffered events per job and upserts them in one statement every `JOBYARD_JOB_LOG_INTERVAL`
seconds. Events from different processes can arrive out of order (a web process flushes
"queued" after the worker flushed "succeeded"), so a row's state only moves to an event at
least as new as the one it holds (`state_at`).

Dramatiq workers do not call `record`: each Lua call that changes a job appends the change to
an outbox in Redis, and the `jobyard worker` supervisor's shipper writes those here with `ship`
(jobyard/worker/shipper.py), exactly once: a job's row keeps the id of the last outbox entry
written (`outbox_id`), checked in the same transaction.

Every write also appends the changes it makes to a row to `job_events` (a new state, engine,
attempt or wake time; a progress report), numbered per job from `job_log.events` in the same
transaction, with the row locked: whichever process writes, on whichever engine, a job's events
form one gap-free sequence, which GET /jobs/{id}/events streams. The price is one locking read
per batch and round, never work on a worker's job thread. Several changes of one job in a batch
are written in rounds (`merge_rounds`), so each state change and each progress report a writer
recorded becomes an event of its own, in order, however fast they came.

A job's history starts with its dispatch, whichever process writes first: the web process
flushes "queued" every interval, and a worker's "running" may reach the log before it. The
writer of a job's first change that is not its dispatch writes a "queued" first, at the job's
enqueue time as it knows it (`dispatch_event`); the dispatch's own record, when it comes, then
merges into the row and adds no event. Numbers follow the order things happened, so a reader
following a job never sees a later event before its dispatch.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import threading
import time
from collections import Counter, deque
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, NamedTuple

import pydantic_core
from sqlalchemy import (
    BigInteger,
    Connection,
    Float,
    Integer,
    Text,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    literal_column,
    null,
    select,
    text,
    update,
)
from sqlalchemy import column as typed_column
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB

from jobyard.job_engine import env
from jobyard.job_engine.db import Base, get_engine, jobstats
from jobyard.job_engine.db.models import FINAL_JOB_STATES, JobEvent, JobLog, JobStat
from jobyard.job_engine.db.readiness import one_line

log = logging.getLogger("jobyard.joblog")

#: Columns an event may set whatever its age (first value wins).
STICKY = ("name", "queue", "payload", "enqueued_at", "started_at", "fallback_reason")
#: Columns that follow the event with the newest state.
LATEST = (
    "engine", "state", "result", "error_class", "error_message", "error_traceback",
    "finished_at", "duration_ms", "state_at",
)  # fmt: skip
#: Columns given in unix seconds to `record` (state_at: the event's time), stored as timestamps.
TIMESTAMPS = ("enqueued_at", "started_at", "finished_at", "state_at", "run_at")
#: Every column an upsert names; progress follows the newest report, attempts, events and
#: outbox_id only grow, run_at is the newest state's (None: not waiting on a timer).
COLUMNS = ("job_id", *STICKY, *LATEST, "progress", "attempts", "run_at", "events", "outbox_id")
#: A row's key (not a column) saying its progress is a report, an event even if the value is
#: the one stored (the outbox's progress entries; a writer's rows may carry the current value).
REPORTED = "progress_reported"
#: A row's key (not a column): the rows it merges, in order, when each part's changes are
#: events of their own (`ship`: one upsert per job, however many changes it had in a batch).
PARTS = "parts"
#: A change from the Dramatiq outbox: (outbox id, unix seconds, job id, the fields it set).
OutboxEvent = tuple[int, float, str, dict[str, Any]]
#: Beyond this many unflushed events (a long database outage), the oldest are dropped.
MAX_BUFFER = 200_000
#: A failing flush is retried every interval; the same failure is logged at most this often.
REPEAT_LOG_SECONDS = 60.0


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class QueuedBatch(NamedTuple):
    """The "queued" of jobs one dispatch call started at once, with the same name, queue and
    engine, and no fallback reason or wake time: what `record(job_id, ts=ts, name=name,
    queue=queue, engine=engine, state="queued", payload=..., enqueued_at=ts)` records for each,
    in one buffer entry. The flush inserts the rows of those new to the log, with their first
    event, in one statement (`write_queued`); a job whose row exists already takes the general
    path, as the event `record` would have queued."""

    ts: float  # unix seconds: the jobs' enqueued_at and state_at, and their event's time
    name: str
    queue: str
    engine: str
    #: (job id, its payload's JSON text as dispatch encoded it: strict JSON, UTF-8). The ids are
    #: dispatch's (`JOB_ID_PATTERN`: no character JSON escapes), so they are written unescaped.
    jobs: list[tuple[str, bytes]]

    def events(self) -> list[tuple[float, str, dict[str, Any]]]:
        """The batch as the events `record` would have queued, one per job."""
        return [
            (self.ts, job_id, {
                "name": self.name, "queue": self.queue, "engine": self.engine,
                "state": "queued", "payload": json.loads(payload), "enqueued_at": self.ts,
            })
            for job_id, payload in self.jobs
        ]  # fmt: skip


class JobLogWriter:
    def __init__(self, url: str | None = None, interval: float | None = None) -> None:
        self.url = url
        self.interval = env.get_float(env.JOB_LOG_INTERVAL) if interval is None else interval
        self._events: deque[tuple[float, str, dict[str, Any]]] = deque(maxlen=MAX_BUFFER)
        self._batches: deque[QueuedBatch] = deque()
        self._batched_jobs = 0  # jobs in self._batches, bounded by MAX_BUFFER as events are
        self._batches_lock = threading.Lock()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def record(self, job_id: str, **fields: Any) -> None:
        """Queue an event; `state_at` defaults to now. Returns at once."""
        ts = fields.pop("ts", None) or time.time()
        self._events.append((ts, job_id, fields))
        if self._thread is None:
            self._start()

    def record_queued(self, batch: QueuedBatch) -> None:
        """Queue the "queued" of every job in `batch`: one buffer entry for them all, which the
        flush inserts in one statement (see `QueuedBatch`). Returns at once."""
        with self._batches_lock:
            self._batches.append(batch)
            self._batched_jobs += len(batch.jobs)
            while self._batched_jobs > MAX_BUFFER and len(self._batches) > 1:
                self._batched_jobs -= len(self._batches.popleft().jobs)  # as the events' maxlen
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="jobyard-joblog", daemon=True
                )
                self._thread.start()
                atexit.register(self._flush_at_exit)

    def _run(self) -> None:
        failing: str | None = None  # the current failure, logged once per REPEAT_LOG_SECONDS
        logged_at = 0.0
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # the database is down: keep the events, try again later
                reason = one_line(exc)
                now = time.monotonic()
                if reason != failing or now - logged_at >= REPEAT_LOG_SECONDS:
                    hint = " (run `jobyard db upgrade`)" if "no such table" in reason else ""
                    log.warning(
                        "job log flush failed: %s%s; %d events kept, retrying every %ss "
                        "(logged again in %.0fs if it persists)",
                        reason, hint, len(self._events), self.interval, REPEAT_LOG_SECONDS,
                    )  # fmt: skip
                    failing, logged_at = reason, now
            else:
                if failing is not None:
                    log.warning("job log flush works again")
                    failing = None

    def _flush_at_exit(self) -> None:
        """The last flush: one line, not a traceback, when the database cannot take it."""
        try:
            self.flush()
        except Exception as exc:
            log.warning(
                "job log: %d events not written at exit: %s", len(self._events), one_line(exc)
            )

    def flush(self) -> int:
        """Write every buffered event now; returns how many rows were upserted."""
        with self._lock:
            events = []
            while self._events:
                events.append(self._events.popleft())
            with self._batches_lock:
                batches = list(self._batches)
                self._batches.clear()
                self._batched_jobs = 0
            if not events and not batches:
                return 0
            try:
                if batches:
                    return write_queued(batches, events, self.url)
                rounds = merge_rounds(events)
                upsert_rounds(rounds, self.url)
            except Exception:
                self._events.extendleft(reversed(events))
                with self._batches_lock:
                    self._batches.extendleft(reversed(batches))
                    self._batched_jobs += sum(len(batch.jobs) for batch in batches)
                raise
            return sum(len(rows) for rows in rounds)


def merge(events: list[tuple[float, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per job: sticky columns keep their first value, the rest follow the newest event.
    Rows hold only the columns some event set (the rest stay NULL, i.e. unchanged), with times
    still in unix seconds."""
    rows: dict[str, dict[str, Any]] = {}
    for ts, job_id, fields in sorted(events, key=lambda e: e[0]):
        row = rows.get(job_id)
        if row is None:
            row = rows[job_id] = {"job_id": job_id}
        for key, value in fields.items():
            if value is None or (key in STICKY and key in row):
                continue
            row[key] = value
        if fields.get("state") is not None:
            row["state_at"] = ts
            # a state without a wake time is not waiting on a timer (any more)
            if fields.get("run_at") is None:
                row.pop("run_at", None)
        if fields.get("progress") is not None:
            row["progress_at"] = ts  # not a column: the progress event's time
    return list(rows.values())


def _row_of(ts: float, job_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    """`merge` of a job's only event."""
    row: dict[str, Any] = {"job_id": job_id}
    row.update((key, value) for key, value in fields.items() if value is not None)
    if fields.get("state") is not None:
        row["state_at"] = ts
    if fields.get("progress") is not None:
        row["progress_at"] = ts
    return row


def merge_rounds(events: list[tuple[float, str, dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Like `merge`, but each job's parts (`segments`) become rows of successive rounds: each
    round is upserted after the one before, so every state change and progress report a
    process recorded becomes an event of its own, in order."""
    if len({job_id for _, job_id, _ in events}) == len(events):
        # One event per job (a batch of dispatches): each is its own row, already in order.
        return [[_row_of(*event) for event in events]]
    rounds: list[list[dict[str, Any]]] = []
    for parts in segments(events).values():
        for index, part in enumerate(parts):
            if index == len(rounds):
                rounds.append([])
            rounds[index].extend(merge(part))
    return rounds


def segments(
    events: list[tuple[float, str, dict[str, Any]]],
) -> dict[str, list[list[tuple[float, str, dict[str, Any]]]]]:
    """Each job's events in time order, cut into parts that hold at most one state and one
    progress value, a state never after a progress value but for a final one (a part's
    events come state first, but for a final state: see `changes_of`)."""
    parts_of: dict[str, list[list[tuple[float, str, dict[str, Any]]]]] = {}
    # Whether each job's current (last) part has a state, and a progress value, so far.
    holds: dict[str, tuple[bool, bool]] = {}
    for event in sorted(events, key=lambda e: e[0]):
        _, job_id, fields = event
        parts = parts_of.setdefault(job_id, [[]])
        has_state, has_progress = holds.get(job_id, (False, False))
        state = fields.get("state")
        progress = fields.get("progress")
        if (
            (state is not None and has_state)
            or (progress is not None and has_progress)
            or (state is not None and state not in FINAL_JOB_STATES and has_progress)
        ):
            parts.append([])
            has_state = has_progress = False
        parts[-1].append(event)
        holds[job_id] = (has_state or state is not None, has_progress or progress is not None)
    return parts_of


def ship(events: list[OutboxEvent], url: str | None = None) -> int:
    """Writes changes from the Dramatiq outbox, in one transaction: the jobs' rows are locked,
    the events a batch wrote before (at or below the job's `outbox_id`: the shipper died
    before trimming them) are skipped, the rest are merged per round (`merge_rounds`) and
    upserted, and each job's `outbox_id` moves to its last event. Returns how many were new.
    On PostgreSQL most endings first go in one UPDATE with the same rules (`_ship_endings`)."""
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
        ids = sorted({job_id for _, _, job_id, _ in events})
        locked = _lock(connection, ids) if connection.dialect.name == "postgresql" else None
        if locked is not None:
            written = {job_id: old["outbox_id"] for job_id, old in locked.items()}
        else:
            written = _outbox_ids_sqlite(connection, ids)
        fresh_of: dict[str, list[OutboxEvent]] = {}
        for event in events:
            if event[0] > (written.get(event[2]) or 0):
                fresh_of.setdefault(event[2], []).append(event)
        rows = [_shipped_row(job_events) for job_events in fresh_of.values()]
        if rows:
            _upsert_in(connection, rows, locked)
    return ended + sum(len(job_events) for job_events in fresh_of.values())


def _endings(events: list[OutboxEvent]) -> list[OutboxEvent]:
    """The batch's jobs whose one change is a final state with no progress report or wake
    time, queued long enough before they ended that the dispatching process has written
    their row (two of its flush intervals): most jobs, shipped after they ended, for
    `_ship_endings`. A job without a row costs that UPDATE for nothing (measured: 13 us more
    shipper CPU per job than the general path alone), so a job that ended sooner goes straight
    to the general path, as does a change with a field the UPDATE does not take."""
    changes_per_job = Counter(event[2] for event in events)
    row_written_after = 2 * env.get_float(env.JOB_LOG_INTERVAL)
    return [
        event
        for event in events
        if changes_per_job[event[2]] == 1
        and event[3].get("state") in FINAL_JOB_STATES
        and event[3].keys() <= ENDING_FIELDS.keys()
        and event[1] - (event[3].get("enqueued_at") or event[1]) > row_written_after
    ]


def _ship_endings(connection: Connection, endings: list[OutboxEvent]) -> set[str]:
    """PostgreSQL: the endings of jobs whose row holds an unfinished state, older than the
    ending, at least one event (its dispatch) and no later outbox entry, in one statement
    (the general path locks the rows first, then upserts them): the row merged as
    `_merge_rules` merges it, the one state event `changes_of` would make, numbered after the
    row's last, and then the job_stats increment.
    Returns the jobs written; the rest take the general path (no row yet, a replayed batch,
    a row already final or newer)."""
    if not endings:
        return set()
    # One lock order (_upsert_in's); times stay unix seconds (the database converts them).
    rows = {job_id: {"job_id": job_id, "outbox_id": entry, "state_at": at, **fields}
            for entry, at, job_id, fields in sorted(endings, key=itemgetter(2))}  # fmt: skip
    connection.execute(_BY_PRIMARY_KEY)
    rows_json = _json_text(list(rows.values()))
    written = connection.execute(_endings_statement(), {"rows": rows_json}).all()
    increments = [
        _ending_stat(rows[job_id], queue, started, enqueued)
        for job_id, queue, started, enqueued in written
    ]
    if increments:
        _add_stats(connection, jobstats.combine(increments))
    return {job_id for job_id, *_ in written}


#: PostgreSQL: the endings UPDATE finds its rows by primary key, one probe per ending. The
#: planner, guessing 100 rows for a JSON recordset, may hash-join it with a scan of the whole
#: job_log instead (seen: 20,000 rows read for a batch of 1,000; a large log costs more each
#: batch). For this transaction only.
_BY_PRIMARY_KEY = text(
    "SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"
)
#: The columns the merge rules read that an ending never sets.
NOT_IN_ENDINGS = ("progress", "run_at", "fallback_reason", "events")
#: The fields of an ending (as the shipper's outbox events carry them) the endings statement
#: takes, with their types there; times are unix seconds.
ENDING_FIELDS = {
    "engine": Text, "state": Text, "name": Text, "queue": Text, "attempts": Integer,
    "enqueued_at": Float, "started_at": Float, "finished_at": Float, "duration_ms": BigInteger,
    "result": JSONB, "payload": JSONB, "error_message": Text, "error_class": Text,
    "error_traceback": Text,
}  # fmt: skip


@functools.cache
def _endings_statement() -> Any:
    """The endings UPDATE (`_merge_rules`, on the conditions `_ship_endings` states), the
    state event of each row it wrote, and what the job_stats increments need of the row."""
    table = Base.metadata.tables[JobLog.__tablename__]
    given = {"job_id": Text, "outbox_id": BigInteger, "state_at": Float, **ENDING_FIELDS}
    raw = (
        func.jsonb_to_recordset(cast(bindparam("rows"), JSONB))
        .table_valued(*[typed_column(name, kind) for name, kind in given.items()])
        .render_derived("raw", with_types=True)
    )
    seconds = ("state_at", "enqueued_at", "started_at", "finished_at")
    ending = select(
        raw.c.job_id, raw.c.outbox_id,
        *[func.to_timestamp(raw.c[name]).label(name) for name in seconds],
        *[raw.c[name] for name in ENDING_FIELDS if name not in seconds],
        *[cast(null(), table.c[name].type).label(name) for name in NOT_IN_ENDINGS],
    ).subquery("ending")  # fmt: skip
    merged = _merge_rules(ending.c) | {"events": table.c.events + 1}
    written = (
        update(table)
        .values(merged)
        .where(
            table.c.job_id == ending.c.job_id,
            table.c.events > 0,  # a row without events takes the general path: its dispatch first
            table.c.state.not_in(FINAL_JOB_STATES),
            table.c.state_at.is_(None) | (ending.c.state_at >= table.c.state_at),
            table.c.outbox_id.is_(None) | (ending.c.outbox_id > table.c.outbox_id),
        )
        .returning(
            table.c.job_id,
            table.c.events,
            table.c.state_at,
            table.c.state,
            table.c.engine,
            table.c.attempts,
            ending.c.error_message,
            table.c.queue,
            # Unix seconds (float8) for the stats: a datetime a row would cost more to make.
            func.date_part("epoch", table.c.started_at).label("started"),
            func.date_part("epoch", table.c.enqueued_at).label("enqueued"),
        )
        .cte("written")
    )
    # The row was unfinished and older: its ending is its one state event (changes_of's
    # rules), with the merged row's engine and attempts.
    events = Base.metadata.tables[JobEvent.__tablename__]
    logged = (
        insert(events)
        .from_select(
            ["job_id", "seq", "at", "kind", "state", "engine", "attempts", "error"],
            select(
                written.c.job_id,
                written.c.events,
                written.c.state_at,
                literal("state"),
                written.c.state,
                written.c.engine,
                written.c.attempts,
                written.c.error_message,
            ),
        )
        .cte("logged")
    )
    return select(written.c.job_id, written.c.queue, written.c.started, written.c.enqueued).add_cte(
        logged
    )


def _shipped_row(job_events: list[OutboxEvent]) -> dict[str, Any]:
    """One job's row from its new outbox events: its final state, and its parts (for the
    events, see `_number`) when it changed more than once."""
    if len(job_events) == 1:  # the usual batch: a job's one change since the last
        outbox_id, ts, job_id, fields = job_events[0]
        row = _row_of(ts, job_id, fields)
    else:
        (parts,) = segments([(ts, j, fields) for _, ts, j, fields in job_events]).values()
        # One row per job, its final state; its parts, for the events (see `_number`).
        row = merge([event for part in parts for event in part])[0]
        if len(parts) > 1:
            row[PARTS] = [merge(part)[0] for part in parts]
        outbox_id = max(event[0] for event in job_events)
    row["outbox_id"] = outbox_id
    return row


def _outbox_ids_sqlite(connection: Connection, ids: list[str]) -> dict[str, int | None]:
    """SQLite: the `outbox_id` of the jobs that have rows, the database locked until the
    transaction ends (by a write first, as `_lock_rows` does)."""
    connection.execute(text("UPDATE job_log SET events = events WHERE 0"))
    table = Base.metadata.tables[JobLog.__tablename__]
    query = select(table.c.job_id, table.c.outbox_id).where(table.c.job_id.in_(ids))
    return {job_id: written for job_id, written in connection.execute(query)}


def upsert(rows: list[dict[str, Any]], url: str | None = None) -> None:
    """One upsert statement per batch, plus the batch's events (see the module docstring). On
    PostgreSQL the rows travel as a single JSON array (jsonb_populate_recordset; absent keys
    are NULL), which costs a fraction of binding every row's parameters."""
    upsert_rounds([rows], url)


def upsert_rounds(rounds: list[list[dict[str, Any]]], url: str | None = None) -> None:
    """Upsert each round of rows (one row per job in a round) in turn, in one transaction."""
    engine = get_engine(url)
    with engine.begin() as connection:
        for rows in rounds:
            if rows:
                _upsert_in(connection, rows)


def write_queued(
    batches: list[QueuedBatch],
    events: list[tuple[float, str, dict[str, Any]]],
    url: str | None = None,
) -> int:
    """Writes `batches` and `events` in one transaction; returns how many rows were upserted.
    The rows of batched jobs new to the log are inserted with their "queued" event in one
    statement (`_insert_queued`): no row to lock, merge or judge, so none of the general path's
    per-row work. The rest (a job whose row a worker's shipper wrote first, a job batched twice)
    and `events` then take the general path, as `record`'s events would: what ends up in the
    log is the same either way."""
    engine = get_engine(url)
    with engine.begin() as connection:
        inserted, left = _insert_queued(connection, batches)
        for batch in left:
            events.extend(batch.events())
        rounds = merge_rounds(events) if events else []
        for rows in rounds:
            if rows:
                _upsert_in(connection, rows)
    return inserted + sum(len(rows) for rows in rounds)


#: PostgreSQL: the rows of batched jobs new to the log and their first event, in one statement;
#: returns the jobs it did not insert (their row exists: usually none). :rows is a JSON array
#: of [job id, batch number, payload], sorted by job id (the order every writer locks rows in);
#: :batches one of [name, queue, engine, time (ISO), time (unix s)].
#: Times as the general path writes them: rows' from ISO text, events' from unix seconds.
_INSERT_QUEUED_PG = text(
    "WITH source AS ("
    " SELECT r ->> 0 AS job_id, b ->> 0 AS name, b ->> 1 AS queue, b ->> 2 AS engine,"
    " CAST(b ->> 3 AS timestamptz) AS at, CAST(b ->> 4 AS float8) AS ts,"
    " NULLIF(r -> 2, 'null'::jsonb) AS payload, n"
    " FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS rs(r, n)"
    " JOIN jsonb_array_elements(CAST(:batches AS jsonb)) WITH ORDINALITY AS bs(b, m)"
    " ON bs.m = CAST(r ->> 1 AS int) + 1"
    "), inserted AS ("
    " INSERT INTO job_log (job_id, name, queue, engine, state, attempts, payload, enqueued_at,"
    " state_at, events)"
    " SELECT job_id, name, queue, engine, 'queued', 0, payload, at, at, 1 FROM source ORDER BY n"
    " ON CONFLICT (job_id) DO NOTHING RETURNING job_id"
    "), numbered AS ("
    " INSERT INTO job_events (job_id, seq, at, kind, state, engine, attempts)"
    " SELECT s.job_id, 1, to_timestamp(s.ts), 'state', 'queued', s.engine, 0"
    " FROM inserted i JOIN source s ON s.job_id = i.job_id"
    ") SELECT s.job_id FROM source s LEFT JOIN inserted i ON i.job_id = s.job_id"
    " WHERE i.job_id IS NULL"
)

#: SQLite: the rows of batched jobs new to the log (their events follow in a second statement);
#: the arguments as PostgreSQL's, times as the naive UTC text SQLite stores.
_INSERT_QUEUED_SQLITE = text(
    "INSERT INTO job_log (job_id, name, queue, engine, state, attempts, payload, enqueued_at,"
    " state_at, events)"
    " SELECT r.value ->> 0, b.value ->> 0, b.value ->> 1, b.value ->> 2, 'queued', 0,"
    " NULLIF(r.value -> 2, 'null'), b.value ->> 3, b.value ->> 3, 1"
    " FROM json_each(:rows) AS r JOIN json_each(:batches) AS b ON b.key = r.value ->> 1"
    " WHERE true ORDER BY r.key"
    " ON CONFLICT (job_id) DO NOTHING RETURNING job_id"
)


def _insert_queued(
    connection: Connection, batches: list[QueuedBatch]
) -> tuple[int, list[QueuedBatch]]:
    """Inserts the rows, and their "queued" events, of the batched jobs new to the log; returns
    how many, and the jobs left for the general path (a row exists, or a job appears twice)."""
    postgres = connection.dialect.name == "postgresql"
    described: list[str] = []
    jobs: list[tuple[str, int, bytes]] = []
    for number, batch in enumerate(batches):
        at = _utc(batch.ts)
        when = at.isoformat() if postgres else _first_seen({"enqueued_at": at}, True)
        described.append(json.dumps([batch.name, batch.queue, batch.engine, when, batch.ts]))
        jobs += [(job_id, number, payload) for job_id, payload in batch.jobs]
    jobs.sort(key=itemgetter(0))  # one lock order for every writer (see _upsert_in)
    once, twice = jobs, []
    if len({job[0] for job in jobs}) < len(jobs):  # a job batched twice (rare): its first stays
        once = [job for at, job in enumerate(jobs) if at == 0 or jobs[at - 1][0] != job[0]]
        twice = [job for at, job in enumerate(jobs) if at > 0 and jobs[at - 1][0] == job[0]]
    rows = [b'["%s",%d,%s]' % (job_id.encode(), n, payload) for job_id, n, payload in once]
    parameters = {
        "rows": (b"[" + b",".join(rows) + b"]").decode(),
        "batches": "[" + ",".join(described) + "]",
    }
    if postgres:
        not_inserted = {job_id for (job_id,) in connection.execute(_INSERT_QUEUED_PG, parameters)}
        left = [job for job in once if job[0] in not_inserted] + twice
        inserted_count = len(once) - len(not_inserted)
    else:
        inserted = {job_id for (job_id,) in connection.execute(_INSERT_QUEUED_SQLITE, parameters)}
        first = [
            {"job_id": job_id, "seq": 1, "at": batches[n].ts, "kind": "state", "state": "queued",
             "engine": batches[n].engine, "attempts": 0}
            for job_id, n, _ in once
            if job_id in inserted
        ]  # fmt: skip
        if first:
            _insert_events(connection, first)
        left = [job for job in once if job[0] not in inserted] + twice
        inserted_count = len(inserted)
    leftover: dict[int, list[tuple[str, bytes]]] = {}
    for job_id, number, payload in left:
        leftover.setdefault(number, []).append((job_id, payload))
    return inserted_count, [batches[n]._replace(jobs=kept) for n, kept in leftover.items()]


Pair = tuple[dict[str, Any], dict[str, Any]]  # (a row as given, the row as stored)


def _upsert_in(
    connection: Connection, rows: list[dict[str, Any]], locked: dict[str, Any] | None = None
) -> None:
    """`locked`: PostgreSQL: `_lock`'s answer for these rows' jobs, if the caller has it."""
    rows = sorted(rows, key=lambda row: str(row["job_id"]))  # one lock order for every writer
    pairs: list[Pair] = [(row, _stored(row)) for row in rows]
    events: list[dict[str, Any]] = []
    finished: list[dict[str, Any]] = []
    if connection.dialect.name == "postgresql":
        before = (
            locked if locked is not None else _lock(connection, [r["job_id"] for r, _ in pairs])
        )
        # Jobs new to the log are inserted whole (no update to merge into); one that another
        # writer inserted meanwhile is locked and merged as the others.
        fresh = [pair for pair in pairs if pair[0]["job_id"] not in before]
        if fresh:
            fresh_events: list[dict[str, Any]] = []
            fresh_finished: list[dict[str, Any]] = []
            _number(fresh, {}, fresh_events, fresh_finished)
            inserted = _insert_new(connection, [kept for _, kept in fresh])
            events += [e for e in fresh_events if e["job_id"] in inserted]
            finished += [f for f in fresh_finished if f["job_id"] in inserted]
            raced = [row["job_id"] for row, _ in fresh if row["job_id"] not in inserted]
            if raced:
                before.update(_lock(connection, raced))
        pairs = [pair for pair in pairs if pair[0]["job_id"] in before]
    else:
        before = _lock_rows(connection, [kept for _, kept in pairs])
    _number(pairs, before, events, finished)
    if pairs:
        connection.execute(*_upsert_statement(connection.dialect.name, [k for _, k in pairs]))
    if events:
        _insert_events(connection, events)
    if finished:
        _add_stats(connection, jobstats.combine([f["stat"] for f in finished]))


def _number(
    pairs: list[Pair],
    before: dict[str, Any],
    events: list[dict[str, Any]],
    finished: list[dict[str, Any]],
) -> None:
    """Appends each row's events, numbered after its job's last, and the job_stats increment
    of each job that reaches a final state; sets the stored rows' event counts. A job's first
    event is always its dispatch: a writer whose first change of a job new to the log is a
    later one writes the dispatch first (`dispatch_event`)."""
    for row, kept in pairs:
        old = before.get(row["job_id"])
        seq = old["events"] if old is not None else 0
        first = seq == 0
        parts = row.get(PARTS)
        for part in parts or (row,):
            for change in changes_of(part, old):
                if first and not (change["kind"] == "state" and change["state"] == "queued"):
                    seq += 1
                    events.append({"job_id": row["job_id"], "seq": seq, **dispatch_event(part)})
                first = False
                seq += 1
                events.append({"job_id": row["job_id"], "seq": seq, **change})
                if change["kind"] == "state" and change["state"] in FINAL_JOB_STATES:
                    previous = old if old is not None and not old.get("new") else {}
                    if previous.get("state") not in FINAL_JOB_STATES:
                        stat = _finish_stat(part, previous)
                        finished.append({"job_id": row["job_id"], "stat": stat})
            if parts:
                old = _applied(part, old)
        kept["events"] = seq


def dispatch_event(row: dict[str, Any]) -> dict[str, Any]:
    """The "queued" a job's history starts with, written by the first writer of a job whose
    first change it has is a later one (a worker's "running", shipped before the web process
    flushed the dispatch): at the job's enqueue time as that writer knows it (a Dramatiq
    job's on Redis's clock, from the outbox; a Temporal job's workflow start), else at the
    change's own time. The dispatch's own record, when it comes, merges into the row and adds
    no event: an event once written never changes, so a reader following the job never sees
    a later event before the dispatch, nor an event it read change."""
    first_at = row.get("state_at") or row.get("progress_at") or time.time()
    enqueued = row.get("enqueued_at")
    at = min(enqueued, first_at) if enqueued is not None else first_at
    return {"at": at, "kind": "state", "state": "queued", "engine": row.get("engine"),
            "attempts": 0, "run_at": None, "error": None}  # fmt: skip


def _applied(row: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """The judged columns of a job's row once `row` is merged into `old` (as `_merge_rules`
    does), to judge the next part of the job's changes against."""
    known = dict(old) if old is not None and not old.get("new") else {}
    at = _utc(row["state_at"]) if row.get("state_at") is not None else None
    old_at = known.get("state_at")
    if row.get("state") is not None and (old_at is None or (at is not None and at >= old_at)):
        known.update(state=row["state"], state_at=at, run_at=None)
        if row.get("run_at"):
            known["run_at"] = _utc(row["run_at"])
        if row.get("engine") is not None:
            known["engine"] = row["engine"]
    if row.get("progress") is not None:
        known["progress"] = row["progress"]
    known["attempts"] = max(row.get("attempts") or 0, known.get("attempts") or 0)
    if known.get("queue") is None:
        known["queue"] = row.get("queue")
    if known.get("started_at") is None and row.get("started_at") is not None:
        known["started_at"] = _utc(row["started_at"])
    enqueued = _utc(row["enqueued_at"]) if row.get("enqueued_at") is not None else None
    if enqueued is not None and (
        known.get("enqueued_at") is None or enqueued < known["enqueued_at"]
    ):
        known["enqueued_at"] = enqueued
    return known


def _lock(connection: Connection, ids: list[str]) -> dict[str, Any]:
    """PostgreSQL: the judged columns of the jobs that have rows, locked until commit."""
    # .all(): iterating the result fetches a row per call, about 10 us a row more.
    return {
        job_id: dict(zip(JUDGED, values, strict=True))
        for job_id, *values in connection.execute(_LOCKING, {"ids": json.dumps(ids)}).all()
    }


def _insert_new(connection: Connection, stored: list[dict[str, Any]]) -> set[str]:
    """PostgreSQL: inserts rows for jobs new to the log; returns the ids it inserted."""
    for kept in stored:  # the listing pages by enqueued_at: never NULL
        if kept.get("enqueued_at") is None:
            kept["enqueued_at"] = kept.get("state_at") or datetime.now(UTC)
    rows = _json_text(stored)
    return {job_id for (job_id,) in connection.execute(_insert_new_statement(), {"rows": rows})}


def _rows_from_json() -> Any:
    """PostgreSQL: the bound JSON array `rows` as job_log records (absent keys are NULL)."""
    table = Base.metadata.tables[JobLog.__tablename__]
    return func.jsonb_populate_recordset(
        literal_column(f"NULL::{table.name}"), cast(bindparam("rows"), JSONB)
    ).table_valued(*COLUMNS)


# The statements are built once: building one (and its merge rules) cost the shipper about a
# third of its CPU per batch.
@functools.cache
def _insert_new_statement() -> Any:
    table = Base.metadata.tables[JobLog.__tablename__]
    source = _rows_from_json()
    return (
        postgresql.insert(table)
        .from_select(COLUMNS, select(*[source.c[c] for c in COLUMNS]))
        .on_conflict_do_nothing(index_elements=["job_id"])
        .returning(table.c.job_id)
    )


#: PostgreSQL: job_events rows as one JSON array, times in unix seconds (to_timestamp).
_INSERT_EVENTS = text(
    "INSERT INTO job_events (job_id, seq, at, kind, state, engine, attempts, progress, run_at, "
    "error) SELECT e.job_id, e.seq, to_timestamp(e.at), e.kind, e.state, e.engine, e.attempts, "
    "e.progress, to_timestamp(e.run_at), e.error FROM jsonb_to_recordset(CAST(:rows AS jsonb)) "
    "AS e(job_id text, seq int, at float8, kind text, state text, engine text, attempts int, "
    "progress jsonb, run_at float8, error text)"
)


def _insert_events(connection: Connection, events: list[dict[str, Any]]) -> None:
    if connection.dialect.name == "postgresql":  # one JSON array, as the upsert's rows
        connection.execute(_INSERT_EVENTS, {"rows": _json_text(events)})
    else:
        table = Base.metadata.tables[JobEvent.__tablename__]
        connection.execute(table.insert(), [_event_row(e) for e in events])


def _seconds(value: Any) -> float | None:
    """A time as unix seconds: rows carry floats, stored rows datetimes."""
    if value is None:
        return None
    return value.timestamp() if isinstance(value, datetime) else float(value)


def _finish_stat(row: dict[str, Any], old: dict[str, Any]) -> jobstats.Increment:
    """The job_stats increment of a job that reached a final state in this row."""
    end = _seconds(row.get("finished_at")) or _seconds(row.get("state_at")) or time.time()
    started = _seconds(row.get("started_at")) or _seconds(old.get("started_at"))
    enqueued = [
        t for t in (_seconds(row.get("enqueued_at")), _seconds(old.get("enqueued_at"))) if t
    ]
    return _increment(row, old.get("queue"), end, started, min(enqueued) if enqueued else None)


def _ending_stat(
    row: dict[str, Any], queue: str | None, started: float | None, enqueued: float | None
) -> jobstats.Increment:
    """`_finish_stat` of an ending `_ship_endings` wrote: the row's times are unix seconds, and
    the merged row's queue, started_at and enqueued_at (the earliest known) come with it."""
    end = row.get("finished_at") or row["state_at"]
    return _increment(
        row, queue, end, row.get("started_at") or started, enqueued or row.get("enqueued_at")
    )


def _increment(
    row: dict[str, Any],
    queue: str | None,
    end: float,
    started: float | None,
    enqueued: float | None,
) -> jobstats.Increment:
    """The increment of a row that ended at `end` (unix seconds): its own duration, or the
    time since it started; its wait from the earliest enqueue known to its start."""
    duration = row.get("duration_ms")
    if duration is None and started is not None:
        duration = (end - started) * 1000
    wait = (started - enqueued) * 1000 if started is not None and enqueued else None
    return jobstats.increment(row.get("queue") or queue, end, row["state"], duration, wait)


def _add_stats(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Adds to job_stats: column = column + the increment, atomic on both databases."""
    connection.execute(_add_stats_statement(connection.dialect.name), rows)


@functools.cache  # building it cost the shipper a tenth of its CPU per batch
def _add_stats_statement(dialect: str) -> Any:
    table = Base.metadata.tables[JobStat.__tablename__]
    statement: postgresql.Insert | sqlite.Insert = (
        postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    )
    return statement.on_conflict_do_update(
        index_elements=["queue", "span", "period_start"],
        set_={c: table.c[c] + statement.excluded[c] for c in jobstats.COUNT_COLUMNS},
    )


#: The columns of a job_log row an event is judged against (outbox_id: `ship`'s).
JUDGED = (
    "state", "state_at", "engine", "attempts", "progress", "run_at", "events", "queue",
    "enqueued_at", "started_at", "outbox_id",
)  # fmt: skip
#: PostgreSQL: `_lock`'s query. The ids come as one JSON array (any string is safe in it):
#: psycopg dumps a Python list as an array element by element, a fifth of the lock's CPU.
#: ARRAY(...) keeps it one value, so the primary key's index finds the rows.
_LOCKING = text(
    f"SELECT job_id, {', '.join(JUDGED)} FROM job_log WHERE job_id = ANY(ARRAY("
    "SELECT jsonb_array_elements_text(CAST(:ids AS jsonb)))) FOR UPDATE"
)


def _lock_rows(connection: Connection, stored: list[dict[str, Any]]) -> dict[str, Any]:
    """SQLite: the batch's rows as they were, the database locked until the transaction ends.
    A stub row is inserted first for a job new to the log, which takes the write lock at
    once, so that two writers never both number a job's events from the same point."""
    ids = [row["job_id"] for row in stored]
    # A new row's enqueued_at is never NULL (the listing pages by it): the earliest time known
    # now; an earlier one arriving later wins (_merge_rules).
    stubs = json.dumps(
        [{"job_id": r["job_id"], "name": r["name"], "at": _first_seen(r, True)} for r in stored]
    )
    created = connection.execute(
        text(
            "INSERT INTO job_log (job_id, name, state, attempts, events, enqueued_at) "
            "SELECT value ->> 'job_id', value ->> 'name', 'queued', 0, 0, value ->> 'at' "
            "FROM json_each(:stubs) WHERE true "
            "ON CONFLICT (job_id) DO NOTHING RETURNING job_id"
        ),
        {"stubs": stubs},
    )
    new = {job_id for (job_id,) in created}
    table = Base.metadata.tables[JobLog.__tablename__]
    current = connection.execute(
        select(table.c.job_id, *[table.c[c] for c in JUDGED]).where(table.c.job_id.in_(ids))
    )
    before: dict[str, Any] = {}
    for job_id, *values in current:
        old = dict(zip(JUDGED, values, strict=True))
        if job_id in new:
            old = {"events": 0, "new": True}
        before[job_id] = old
    return before


def _first_seen(row: dict[str, Any], sqlite_text: bool) -> str:
    """The earliest time a stored row knows of its job, as the stub insert takes it (SQLite:
    the naive UTC text SQLAlchemy stores there)."""
    first: datetime = row.get("enqueued_at") or row.get("state_at") or datetime.now(UTC)
    if sqlite_text:
        return first.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return first.isoformat()


def changes_of(row: dict[str, Any], old: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The events a row (times in unix seconds) adds to a job whose row was `old`: a state
    event when its state is newer and changes the state, engine, attempt or wake time; a
    progress event for a new progress value, or any value the row says was reported (REPORTED),
    before a final state, after any other."""
    known = old is not None and not old.get("new")
    previous: dict[str, Any] = old if known and old is not None else {}
    at = row.get("state_at")
    state = row.get("state")
    old_at = previous.get("state_at")
    newer = state is not None and (old_at is None or (at is not None and _utc(at) >= old_at))
    state_event: dict[str, Any] | None = None
    if newer:
        engine = row.get("engine") or previous.get("engine")
        attempts = max(row.get("attempts") or 0, previous.get("attempts") or 0)
        run_at = _utc(row["run_at"]) if row.get("run_at") else None
        if (
            state != previous.get("state")
            or engine != previous.get("engine")
            or attempts > (previous.get("attempts") or 0)
            or run_at != previous.get("run_at")
        ):
            state_event = {
                "at": at if at is not None else time.time(), "kind": "state", "state": state,
                "engine": engine, "attempts": attempts, "run_at": row.get("run_at"),
                "error": row.get("error_message") if state in FINAL_JOB_STATES else None,
            }  # fmt: skip
    progress = row.get("progress")
    progress_event: dict[str, Any] | None = None
    if progress is not None and (row.get(REPORTED) or progress != previous.get("progress")):
        reported_at = row.get("progress_at") or at
        progress_event = {
            "at": reported_at if reported_at is not None else time.time(), "kind": "progress",
            "engine": row.get("engine") or previous.get("engine"), "progress": progress,
        }  # fmt: skip
    if state_event is not None and state in FINAL_JOB_STATES:
        return [e for e in (progress_event, state_event) if e is not None]
    return [e for e in (state_event, progress_event) if e is not None]


def _event_row(event: dict[str, Any]) -> dict[str, Any]:
    row = {c: event.get(c) for c in ("job_id", "seq", "kind", "state", "engine", "attempts")}
    row["progress"] = event.get("progress")
    row["error"] = event.get("error")
    row["at"] = _utc(event["at"])
    row["run_at"] = _utc(event["run_at"]) if event.get("run_at") else None
    return row


def _upsert_statement(dialect: str, rows: list[dict[str, Any]]) -> tuple[Any, Any]:
    if dialect == "postgresql":
        parameters: Any = {"rows": _json_text(rows)}
    else:
        parameters = [{c: row.get(c) for c in COLUMNS} for row in rows]
    return _upsert_sql(dialect), parameters


@functools.cache
def _upsert_sql(dialect: str) -> Any:
    table = Base.metadata.tables[JobLog.__tablename__]  # __table__ is typed as any FromClause
    statement: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        source = _rows_from_json()
        statement = postgresql.insert(table).from_select(
            COLUMNS, select(*[source.c[c] for c in COLUMNS])
        )
    else:
        statement = sqlite.insert(table)
    return statement.on_conflict_do_update(
        index_elements=["job_id"], set_=_merge_rules(statement.excluded)
    )


def _stored(row: dict[str, Any]) -> dict[str, Any]:
    """A copy of `row` as the table takes it (a caller may retry with the original)."""
    stored = {"state": "queued", "name": "unknown", "attempts": 0, "events": 0, **row}
    stored.pop(PARTS, None)
    for column in TIMESTAMPS:
        if column in stored:
            stored[column] = _utc(stored[column])
    return stored


def _merge_rules(new: Any) -> dict[str, Any]:
    """How a row absorbs a newer (or older) event; see the module docstring."""
    old = Base.metadata.tables[JobLog.__tablename__].c
    newer = old.state_at.is_(None) | (new.state_at.is_not(None) & (new.state_at >= old.state_at))
    rules: dict[str, Any] = {c: func.coalesce(old[c], new[c]) for c in STICKY}
    # the earliest known: a stub row's first guess gives way to the dispatch's own time
    rules["enqueued_at"] = case(
        (new.enqueued_at.is_(None), old.enqueued_at),
        (old.enqueued_at.is_(None) | (new.enqueued_at < old.enqueued_at), new.enqueued_at),
        else_=old.enqueued_at,
    )
    rules |= {c: case((newer, func.coalesce(new[c], old[c])), else_=old[c]) for c in LATEST}
    rules["progress"] = func.coalesce(new.progress, old.progress)
    rules["attempts"] = case((new.attempts > old.attempts, new.attempts), else_=old.attempts)
    rules["events"] = case((new.events > old.events, new.events), else_=old.events)
    rules["outbox_id"] = case(
        (old.outbox_id.is_(None) | (new.outbox_id > old.outbox_id), new.outbox_id),
        else_=old.outbox_id,
    )
    rules["run_at"] = case((newer, new.run_at), else_=old.run_at)
    # A replayed job starts over: the newer "queued" clears when it finished.
    replayed = newer & (new.state == "queued")
    rules["finished_at"] = case((replayed, None), else_=rules["finished_at"])
    return rules


def _json_text(rows: list[dict[str, Any]]) -> str:
    """Rows as one JSON array, datetimes in ISO 8601. pydantic-core's encoder (a dependency
    already) does it in a fifth of the time of json.dumps with a `default` hook for datetimes.
    What it refuses (a lone surrogate in a job's result) goes through json.dumps, which writes
    it as an escape: the database then refuses the row, and the writer stores the job without
    its JSON (see the shipper) rather than failing the whole batch."""
    try:
        return pydantic_core.to_json(rows).decode()
    except pydantic_core.PydanticSerializationError:
        return json.dumps(rows, default=_iso_datetime)


def _iso_datetime(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


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

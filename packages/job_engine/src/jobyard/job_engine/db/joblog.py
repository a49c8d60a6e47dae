"""The job log: every job's life in the database, written off the hot path.

`record(job_id, name, state=..., ...)` appends an event to an in-process buffer (a deque
append: no I/O on the dispatch path or in the worker loop; times stay unix seconds until the
flush turns them into datetimes); a background thread merges the
buffered events per job and upserts them in one statement every `JOBYARD_JOB_LOG_INTERVAL`
seconds. Events from different processes can arrive out of order (a web process flushes
"queued" after the worker flushed "succeeded"), so a row's state only moves to an event at
least as new as the one it holds (`state_at`).

Dramatiq workers do not call `record`: the Redis record of a job is the source, and the
`jobyard worker` supervisor ships changed records here with `upsert` (jobyard/worker/shipper.py).
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, case, cast, func, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB

from jobyard.job_engine import env
from jobyard.job_engine.db import Base, get_engine
from jobyard.job_engine.db.models import JobLog
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
TIMESTAMPS = ("enqueued_at", "started_at", "finished_at", "state_at")
#: Every column an upsert names; progress follows the newest report, attempts only grow.
COLUMNS = ("job_id", *STICKY, *LATEST, "progress", "attempts")
#: Beyond this many unflushed events (a long database outage), the oldest are dropped.
MAX_BUFFER = 200_000
#: A failing flush is retried every interval; the same failure is logged at most this often.
REPEAT_LOG_SECONDS = 60.0


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class JobLogWriter:
    def __init__(self, url: str | None = None, interval: float | None = None) -> None:
        self.url = url
        self.interval = env.get_float(env.JOB_LOG_INTERVAL) if interval is None else interval
        self._events: deque[tuple[float, str, dict[str, Any]]] = deque(maxlen=MAX_BUFFER)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def record(self, job_id: str, **fields: Any) -> None:
        """Queue an event; `state_at` defaults to now. Returns at once."""
        ts = fields.pop("ts", None) or time.time()
        self._events.append((ts, job_id, fields))
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
            if not events:
                return 0
            try:
                rows = merge(events)
                upsert(rows, self.url)
            except Exception:
                self._events.extendleft(reversed(events))
                raise
            return len(rows)


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
    return list(rows.values())


def upsert(rows: list[dict[str, Any]], url: str | None = None) -> None:
    """One upsert statement per batch. On PostgreSQL the rows travel as a single JSON array
    (jsonb_populate_recordset; absent keys are NULL), which costs a fraction of binding every
    row's parameters."""
    engine = get_engine(url)
    rows = [_stored(row) for row in rows]
    table = Base.metadata.tables[JobLog.__tablename__]  # __table__ is typed as any FromClause
    statement: postgresql.Insert | sqlite.Insert
    if engine.dialect.name == "postgresql":
        source = func.jsonb_populate_recordset(
            literal_column(f"NULL::{table.name}"), cast(bindparam("rows"), JSONB)
        ).table_valued(*COLUMNS)
        statement = postgresql.insert(table).from_select(
            COLUMNS, select(*[source.c[c] for c in COLUMNS])
        )
        parameters: Any = {"rows": json.dumps(rows, default=_json_default)}
    else:
        statement = sqlite.insert(table)
        parameters = [{c: row.get(c) for c in COLUMNS} for row in rows]
    upserted = statement.on_conflict_do_update(
        index_elements=["job_id"], set_=_merge_rules(statement.excluded)
    )
    with engine.begin() as connection:
        connection.execute(upserted, parameters)


def _stored(row: dict[str, Any]) -> dict[str, Any]:
    """A copy of `row` as the table takes it (a caller may retry with the original)."""
    stored = {"state": "queued", "name": "unknown", "attempts": 0, **row}
    for column in TIMESTAMPS:
        if column in stored:
            stored[column] = _utc(stored[column])
    return stored


def _merge_rules(new: Any) -> dict[str, Any]:
    """How a row absorbs a newer (or older) event; see the module docstring."""
    old = Base.metadata.tables[JobLog.__tablename__].c
    newer = old.state_at.is_(None) | (new.state_at.is_not(None) & (new.state_at >= old.state_at))
    rules: dict[str, Any] = {c: func.coalesce(old[c], new[c]) for c in STICKY}
    rules |= {c: case((newer, func.coalesce(new[c], old[c])), else_=old[c]) for c in LATEST}
    rules["progress"] = func.coalesce(new.progress, old.progress)
    rules["attempts"] = case((new.attempts > old.attempts, new.attempts), else_=old.attempts)
    # A replayed job starts over: the newer "queued" clears when it finished.
    replayed = newer & (new.state == "queued")
    rules["finished_at"] = case((replayed, None), else_=rules["finished_at"])
    return rules


def _json_default(value: Any) -> Any:
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

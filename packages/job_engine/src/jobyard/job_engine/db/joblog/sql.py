"""The job log's statements every write path shares, for PostgreSQL and SQLite: rows upserted
with the merge rules, rows locked and read, new rows inserted, events inserted. On PostgreSQL
a batch travels as one JSON array (`json_text`), which costs a fraction of binding every
row's parameters; SQLite takes the rows as parameters.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from typing import Any

import pydantic_core
from sqlalchemy import Connection, bindparam, cast, func, literal_column, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB

from jobyard.job_engine.db import Base
from jobyard.job_engine.db.joblog.merge import COLUMNS, merge_rules, utc
from jobyard.job_engine.db.models import JobEvent, JobLog
from jobyard.job_engine.states import JobState


def json_text(rows: list[dict[str, Any]]) -> str:
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


def insert_new(connection: Connection, stored: list[dict[str, Any]]) -> set[str]:
    """PostgreSQL: inserts rows for jobs new to the log; returns the ids it inserted."""
    for kept in stored:  # the listing pages by enqueued_at: never NULL
        if kept.get("enqueued_at") is None:
            kept["enqueued_at"] = kept.get("state_at") or datetime.now(UTC)
    rows = json_text(stored)
    return {job_id for (job_id,) in connection.execute(_insert_new_statement(), {"rows": rows})}


def upsert_statement(dialect: str, rows: list[dict[str, Any]]) -> tuple[Any, Any]:
    if dialect == "postgresql":
        parameters: Any = {"rows": json_text(rows)}
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
        index_elements=["job_id"], set_=merge_rules(statement.excluded)
    )


#: PostgreSQL: job_events rows as one JSON array, times in unix seconds (to_timestamp).
_INSERT_EVENTS = text(
    "INSERT INTO job_events (job_id, seq, at, kind, state, engine, attempts, progress, run_at, "
    "error, display_state, waiting_reason) SELECT e.job_id, e.seq, to_timestamp(e.at), e.kind, "
    "e.state, e.engine, e.attempts, e.progress, to_timestamp(e.run_at), e.error, "
    "e.display_state, e.waiting_reason FROM jsonb_to_recordset(CAST(:rows AS jsonb)) "
    "AS e(job_id text, seq int, at float8, kind text, state text, engine text, attempts int, "
    "progress jsonb, run_at float8, error text, display_state text, waiting_reason text)"
)


def insert_events(connection: Connection, events: list[dict[str, Any]]) -> None:
    if connection.dialect.name == "postgresql":  # one JSON array, as the upsert's rows
        connection.execute(_INSERT_EVENTS, {"rows": json_text(events)})
    else:
        table = Base.metadata.tables[JobEvent.__tablename__]
        connection.execute(table.insert(), [_event_row(e) for e in events])


def _event_row(event: dict[str, Any]) -> dict[str, Any]:
    row = {c: event.get(c) for c in ("job_id", "seq", "kind", "state", "engine", "attempts")}
    row["progress"] = event.get("progress")
    row["error"] = event.get("error")
    row["display_state"] = event.get("display_state")
    row["waiting_reason"] = event.get("waiting_reason")
    row["at"] = utc(event["at"])
    row["run_at"] = utc(event["run_at"]) if event.get("run_at") else None
    return row


#: The columns of a job_log row an event is judged against (outbox_id: `ship`'s).
JUDGED = (
    "state", "state_at", "engine", "attempts", "progress", "run_at", "events", "queue",
    "enqueued_at", "started_at", "outbox_id",
)  # fmt: skip

#: PostgreSQL: `lock`'s query. The ids come as one JSON array (any string is safe in it):
#: psycopg dumps a Python list as an array element by element, a fifth of the lock's CPU.
#: ARRAY(...) keeps it one value, so the primary key's index finds the rows.
_LOCKING = text(
    f"SELECT job_id, {', '.join(JUDGED)} FROM job_log WHERE job_id = ANY(ARRAY("
    "SELECT jsonb_array_elements_text(CAST(:ids AS jsonb)))) FOR UPDATE"
)


def lock(connection: Connection, ids: list[str]) -> dict[str, Any]:
    """PostgreSQL: the judged columns of the jobs that have rows, locked until commit."""
    # .all(): iterating the result fetches a row per call, about 10 us a row more.
    return {
        job_id: dict(zip(JUDGED, values, strict=True))
        for job_id, *values in connection.execute(_LOCKING, {"ids": json.dumps(ids)}).all()
    }


def lock_rows(connection: Connection, stored: list[dict[str, Any]]) -> dict[str, Any]:
    """SQLite: the batch's rows as they were, the database locked until the transaction ends.
    A stub row is inserted first for a job new to the log, which takes the write lock at
    once, so that two writers never both number a job's events from the same point."""
    ids = [row["job_id"] for row in stored]
    # A new row's enqueued_at is never NULL (the listing pages by it): the earliest time known
    # now; an earlier one arriving later wins (merge_rules).
    stubs = json.dumps(
        [{"job_id": r["job_id"], "name": r["name"], "at": first_seen(r, True)} for r in stored]
    )
    created = connection.execute(
        text(
            "INSERT INTO job_log (job_id, name, state, attempts, events, enqueued_at) "
            f"SELECT value ->> 'job_id', value ->> 'name', '{JobState.QUEUED}', 0, 0,"
            " value ->> 'at' "
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


def first_seen(row: dict[str, Any], sqlite_text: bool) -> str:
    """The earliest time a stored row knows of its job, as the stub insert takes it (SQLite:
    the naive UTC text SQLAlchemy stores there)."""
    first: datetime = row.get("enqueued_at") or row.get("state_at") or datetime.now(UTC)
    if sqlite_text:
        return first.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return first.isoformat()


def outbox_ids_sqlite(connection: Connection, ids: list[str]) -> dict[str, int | None]:
    """SQLite: the `outbox_id` of the jobs that have rows, the database locked until the
    transaction ends (by a write first, as `lock_rows` does)."""
    connection.execute(text("UPDATE job_log SET events = events WHERE 0"))
    table = Base.metadata.tables[JobLog.__tablename__]
    query = select(table.c.job_id, table.c.outbox_id).where(table.c.job_id.in_(ids))
    return {job_id: written for job_id, written in connection.execute(query)}

"""The dispatch outbox (table `dispatch_outbox`): jobs dispatched inside the caller's own
transaction, `dispatch_job(..., connection=conn)`, and the relay's side of it.

The caller's transaction inserts one row per job (`insert`) and nothing else happens until it
commits: a rollback, or a savepoint rolled back, takes the row with it. On PostgreSQL a trigger
(migration 0011) NOTIFYs `NOTIFY_CHANNEL` at commit. A relay (jobyard/dispatcher/relay.py) then,
in one transaction of its own: deletes a batch of committed rows (`take`: `FOR UPDATE SKIP
LOCKED` on PostgreSQL, so several relays share the work; SQLite serialises writers), sends them
to an engine, writes each job's `job_log` row, and puts back the rows no engine took (`put_back`,
with a backoff). A relay killed mid-batch rolls all of it back: its rows are taken again and sent
again under the same job ids, which the engines and the id registry dedupe.

Not the job log's Dramatiq outbox (the Redis stream the shipper reads, joblog/outbox.py).

The SQL is written for a DB-API cursor (`Target`), so that the same statements run on a
SQLAlchemy connection and on Django's own connection (jobyard/django/backend.py).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Connection

from jobyard.job_engine import crypto
from jobyard.job_engine.errors import JobyardError

TABLE = "dispatch_outbox"
#: The PostgreSQL channel the table's insert trigger notifies (migration 0011 spells it too).
NOTIFY_CHANNEL = "jobyard_dispatch_outbox"
#: The columns `insert` writes, in order.
COLUMNS = ("job_id", "name", "queue", "payload", "options", "enqueued_at", "available_at")


class OutboxMissingError(JobyardError):
    """The transaction's database has no dispatch_outbox table: it is not migrated."""


class OutboxDatabaseError(JobyardError):
    """The transaction's database is not the one DATABASE_URL names, where the relays look."""


class Target(Protocol):
    """A DB-API connection inside the caller's transaction, as the outbox needs it."""

    dialect: str  # "postgresql" or "sqlite"
    placeholder: str  # the driver's: "%s" (psycopg, Django's cursors) or "?" (sqlite3)

    def rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]: ...

    def execute_many(self, sql: str, params: list[tuple[Any, ...]]) -> None: ...

    def cache(self) -> dict[str, Any]:
        """A dict that lives as long as the DB-API connection: its checked identity."""
        ...


class OutboxRow(NamedTuple):
    """One job for the outbox, checked and encoded by the dispatcher."""

    job_id: str
    name: str
    queue: str
    payload: str  # the payload's strict JSON text
    options: str | None  # the dispatch's options as JSON, None when it gave none
    enqueued_at: float  # unix seconds


@dataclass(frozen=True)
class Entry:
    """A row a relay took: `OutboxRow`'s fields, its id and its sends so far."""

    id: int
    job_id: str
    name: str
    queue: str
    payload: str
    options: str | None
    enqueued_at: float
    attempts: int

    def options_dict(self) -> dict[str, Any]:
        return json.loads(self.options) if self.options else {}


# ---- the caller's side -------------------------------------------------------------------------


def insert(target: Target, rows: list[OutboxRow]) -> None:
    """The jobs' rows, in the caller's transaction. A job id already in the outbox (the same
    caller-chosen id dispatched twice before a relay took it) is left as it was."""
    marks = ", ".join([target.placeholder] * len(COLUMNS))
    sql = (
        f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({marks})"
        " ON CONFLICT (job_id) DO NOTHING"
    )
    if crypto.RING is not None:  # kept sealed; the relay sends it on as it is
        rows = [row._replace(payload=crypto.seal_json(row.job_id, row.payload)) for row in rows]
    target.execute_many(sql, [(*row, row.enqueued_at) for row in rows])


def known_names(target: Target, job_ids: list[str]) -> dict[str, str]:
    """Job name per id, of `job_ids` already dispatched: in the outbox, the job log or the id
    registry (caller-chosen ids only: a generated one is new)."""
    if not job_ids:
        return {}
    marks = ", ".join([target.placeholder] * len(job_ids))
    sql = " UNION ALL ".join(
        f"SELECT job_id, name FROM {table} WHERE job_id IN ({marks})"
        for table in (TABLE, "job_log", "job_owners")
    )
    return {job_id: name for job_id, name in target.rows(sql, job_ids * 3)}


def check_target(target: Target, database_url: str) -> None:
    """Refuses a transaction on a database the relays do not read (another than DATABASE_URL),
    or one without the outbox table; checked once per DB-API connection."""
    cache = target.cache()
    if cache.get("jobyard_outbox_checked") == database_url:
        return
    identity, has_table = _identity(target)
    expected = _expected_identity(database_url, fresh=False)
    if identity != expected:
        expected = _expected_identity(database_url, fresh=True)  # the server may have restarted
    if identity != expected:
        raise OutboxDatabaseError(
            f"dispatch_job(connection=...) needs a connection to the database DATABASE_URL names "
            f"({_redacted(database_url)}): the relays send only its outbox's rows. This "
            f"connection is to {_describe(identity)}, that URL to {_describe(expected)}."
        )
    if not has_table:
        raise OutboxMissingError(
            f"the database has no {TABLE} table, which dispatch_job(connection=...) writes: "
            "run `jobyard db upgrade` (with the same DATABASE_URL)."
        )
    cache["jobyard_outbox_checked"] = database_url


def _identity(target: Target) -> tuple[tuple[Any, ...], bool]:
    """What tells two connections to the same database from two to different ones, and whether
    it has the outbox table. PostgreSQL: the database, the schema the table is found in and the
    server's start time (the same server however it is reached: an address, a proxy);
    SQLite: the file."""
    if target.dialect == "postgresql":
        ((database, schema, started, table),) = target.rows(
            "SELECT current_database(), current_schema(), CAST(pg_postmaster_start_time() AS"
            f" text), to_regclass('{TABLE}') IS NOT NULL",
            (),
        )
        return ("postgresql", database, schema, started), bool(table)
    ((path, table),) = target.rows(
        "SELECT (SELECT file FROM pragma_database_list WHERE name = 'main'),"
        f" (SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{TABLE}')",
        (),
    )
    return ("sqlite", os.path.realpath(path) if path else ":memory:"), bool(table)


_expected: dict[str, tuple[Any, ...]] = {}
_expected_lock = threading.Lock()


def _expected_identity(database_url: str, *, fresh: bool) -> tuple[Any, ...]:
    from jobyard.job_engine.db import get_engine

    with _expected_lock:
        if fresh or database_url not in _expected:
            with get_engine(database_url).connect() as connection:
                _expected[database_url] = _identity(SqlAlchemyTarget(connection))[0]
        return _expected[database_url]


def _describe(identity: tuple[Any, ...]) -> str:
    if identity[0] == "postgresql":
        return f"PostgreSQL database {identity[1]!r} (schema {identity[2]!r})"
    return f"SQLite file {identity[1]}"


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class SqlAlchemyTarget:
    """`Target` on a SQLAlchemy connection (its transaction is the caller's)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.dialect = connection.dialect.name
        self.placeholder = "?" if self.dialect == "sqlite" else "%s"

    def rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.connection.exec_driver_sql(sql, tuple(params))]

    def execute_many(self, sql: str, params: list[tuple[Any, ...]]) -> None:
        self.connection.exec_driver_sql(sql, params)

    def cache(self) -> dict[str, Any]:
        return self.connection.info


# ---- the relay's side --------------------------------------------------------------------------

_ENTRY = "id, job_id, name, queue, payload, options, enqueued_at, attempts"


def take(connection: Connection, limit: int, now: float) -> list[Entry]:
    """Deletes up to `limit` committed rows due by `now`, oldest first, in the relay's
    transaction, and returns them. PostgreSQL skips rows another relay holds."""
    lock = " FOR UPDATE SKIP LOCKED" if connection.dialect.name == "postgresql" else ""
    target = SqlAlchemyTarget(connection)
    mark = target.placeholder
    sql = (
        f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE available_at <= {mark}"
        f" ORDER BY id LIMIT {mark}{lock}) RETURNING {_ENTRY}"
    )
    entries = [Entry(*row) for row in target.rows(sql, (now, limit))]
    entries.sort(key=lambda entry: entry.id)
    return entries


def put_back(connection: Connection, failed: list[tuple[Entry, str, float]]) -> None:
    """Rows no engine took: (entry, why, when to try again), as they were, one send more."""
    if not failed:
        return
    target = SqlAlchemyTarget(connection)
    columns = (*COLUMNS, "id", "attempts", "last_error")
    marks = ", ".join([target.placeholder] * len(columns))
    sql = f"INSERT INTO {TABLE} ({', '.join(columns)}) VALUES ({marks})"
    target.execute_many(
        sql,
        [
            (e.job_id, e.name, e.queue, e.payload, e.options, e.enqueued_at, at, e.id,
             e.attempts + 1, why[:2000])
            for e, why, at in failed
        ],
    )  # fmt: skip


def waiting(connection: Connection, job_id: str) -> str | None:
    """The job's name if it is in the outbox (committed, not sent yet), else None."""
    target = SqlAlchemyTarget(connection)
    found = target.rows(f"SELECT name FROM {TABLE} WHERE job_id = {target.placeholder}", (job_id,))
    return found[0][0] if found else None


def peek(connection: Connection, limit: int, now: float) -> list[Entry]:
    """Up to `limit` committed rows due by `now`, oldest first, left in place (SQLite's relays
    read, send, then `delete`)."""
    target = SqlAlchemyTarget(connection)
    mark = target.placeholder
    sql = f"SELECT {_ENTRY} FROM {TABLE} WHERE available_at <= {mark} ORDER BY id LIMIT {mark}"
    return [Entry(*row) for row in target.rows(sql, (now, limit))]


def delete(connection: Connection, entries: list[Entry]) -> set[int]:
    """Deletes the rows of `entries` still there; returns their ids. A row is matched by its id
    and its job id together: SQLite gives a new row the id of one deleted when the table was
    emptied in between (no AUTOINCREMENT), and matched by id alone, a later job's row would go
    without being sent (measured: 17 of 1,600 committed jobs in the chaos row)."""
    if not entries:
        return set()
    target = SqlAlchemyTarget(connection)
    mark = target.placeholder
    matches = " OR ".join([f"(id = {mark} AND job_id = {mark})"] * len(entries))
    sql = f"DELETE FROM {TABLE} WHERE {matches} RETURNING id"
    params = [value for entry in entries for value in (entry.id, entry.job_id)]
    return {row[0] for row in target.rows(sql, params)}

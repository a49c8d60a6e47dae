"""The job_stats increments of the jobs a write ends (see jobstats.py), and their addition."""

from __future__ import annotations

import functools
import time
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from jobyard.job_engine.db import Base, jobstats
from jobyard.job_engine.db.models import JobStat


def _seconds(value: Any) -> float | None:
    """A time as unix seconds: rows carry floats, stored rows datetimes."""
    if value is None:
        return None
    return value.timestamp() if isinstance(value, datetime) else float(value)


def finish_stat(row: dict[str, Any], old: dict[str, Any]) -> jobstats.Increment:
    """The job_stats increment of a job that reached a final state in this row."""
    end = _seconds(row.get("finished_at")) or _seconds(row.get("state_at")) or time.time()
    started = _seconds(row.get("started_at")) or _seconds(old.get("started_at"))
    enqueued = [
        t for t in (_seconds(row.get("enqueued_at")), _seconds(old.get("enqueued_at"))) if t
    ]
    return _increment(row, old.get("queue"), end, started, min(enqueued) if enqueued else None)


def ending_stat(
    row: dict[str, Any], queue: str | None, started: float | None, enqueued: float | None
) -> jobstats.Increment:
    """`finish_stat` of an ending `ship_endings` wrote: the row's times are unix seconds, and
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


def add_stats(connection: Connection, rows: list[dict[str, Any]]) -> None:
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

"""A call limiter kept in the database, so every worker of both engines shares it.

Two fixed windows are checked together, in one transaction, right before each API call:

* the rate window (`GEMINI_RATE_LIMIT` calls per `GEMINI_RATE_PERIOD` seconds, default 60/60 s);
* the UTC day (`GEMINI_DAILY_LIMIT` calls, default 1333).

Each is one row of `ai_usage_windows`, incremented with

    INSERT ... VALUES (scope, window, 1)
    ON CONFLICT (scope, window_start) DO UPDATE SET calls = calls + 1 WHERE calls < :limit
    RETURNING calls

which returns no row when the window is full. PostgreSQL serialises concurrent upserts of one row
(the row lock is held to the end of the short transaction, never across the API call), and SQLite
(>= 3.35, for RETURNING) serialises all writers. The day row is locked first, then the rate row,
always in that order, so two reservations cannot deadlock. A full rate window rolls the day
increment back: a call that is not sent costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Table, update
from sqlalchemy.dialects import postgresql, sqlite

from jobyard.job_engine.db import Base, get_engine, utcnow
from jobyard.job_engine.services.ai.models import AiUsageWindow

DAY_SECONDS = 86_400
KEEP_SECONDS = 3 * DAY_SECONDS  # rows older than this are deleted when a new day starts

# The Table itself: `AiUsageWindow.__table__` is typed as any FromClause (a mapping may be a join).
_table: Table = Base.metadata.tables[AiUsageWindow.__tablename__]


@dataclass(frozen=True)
class Reservation:
    """The outcome of `reserve`. `granted`: the call may be sent now."""

    granted: bool
    daily_exhausted: bool = False
    retry_after: float = 0.0  # seconds until the window that refused us ends
    window_calls: int | None = None  # calls in the rate window, this one included
    day_calls: int | None = None  # calls today (UTC), this one included
    day_start: int = 0
    window_start: int = 0

    @property
    def day(self) -> str:
        return datetime.fromtimestamp(self.day_start, UTC).date().isoformat()


def _upsert(conn: Connection, scope: str, window_start: int, limit: int) -> int | None:
    """Count one call in (scope, window_start) unless it already holds `limit`; the new count."""
    if limit <= 0:
        return None
    dialect = conn.dialect.name
    insert: Callable[[Table], postgresql.Insert | sqlite.Insert]
    if dialect == "postgresql":
        insert = postgresql.insert
    elif dialect == "sqlite":
        insert = sqlite.insert
    else:  # pragma: no cover - jobyard supports PostgreSQL and SQLite
        raise RuntimeError(f"the AI call limiter does not support the {dialect!r} database")
    now = utcnow()
    stmt = (
        insert(_table)
        .values(scope=scope, window_start=window_start, calls=1, updated_at=now)
        .on_conflict_do_update(
            index_elements=[_table.c.scope, _table.c.window_start],
            set_={"calls": _table.c.calls + 1, "updated_at": now},
            where=_table.c.calls < limit,
        )
        .returning(_table.c.calls)
    )
    row = conn.execute(stmt).first()
    return None if row is None else int(row[0])


def reserve(
    service: str,
    *,
    rate_limit: int,
    rate_period: float,
    daily_limit: int,
    now: float | None = None,
    url: str | None = None,
) -> Reservation:
    """Atomically count one call of `service` in the current rate window and UTC day, or refuse.

    Refused for the day: `daily_exhausted=True` (retry_after = seconds to 00:00 UTC). Refused for
    the rate window: `granted=False` and `retry_after` = seconds until the window ends. Nothing is
    counted when refused.
    """
    if rate_period <= 0:
        raise ValueError(f"rate period must be positive, not {rate_period}")
    current = time.time() if now is None else now
    period = int(rate_period) if float(rate_period).is_integer() else rate_period
    day_start = int(current // DAY_SECONDS) * DAY_SECONDS
    window_start = int(current // period * period)
    window_end = window_start + period
    rate_scope = f"{service}:{period}s"
    with get_engine(url).connect() as conn, conn.begin() as tx:
        day_calls = _upsert(conn, f"{service}:day", day_start, daily_limit)
        if day_calls is None:
            tx.rollback()
            return Reservation(
                granted=False,
                daily_exhausted=True,
                retry_after=day_start + DAY_SECONDS - current,
                day_start=day_start,
                window_start=window_start,
            )
        window_calls = _upsert(conn, rate_scope, window_start, rate_limit)
        if window_calls is None:
            tx.rollback()
            return Reservation(
                granted=False,
                retry_after=max(0.0, window_end - current),
                day_calls=day_calls - 1,
                day_start=day_start,
                window_start=window_start,
            )
        if day_calls == 1:  # the first call of a day sweeps rows nobody needs any more
            conn.execute(_table.delete().where(_table.c.window_start < current - KEEP_SECONDS))
    return Reservation(
        granted=True,
        window_calls=window_calls,
        day_calls=day_calls,
        day_start=day_start,
        window_start=window_start,
    )


def record_tokens(
    service: str, day_start: int, prompt_tokens: int, output_tokens: int, *, url: str | None = None
) -> None:
    """Add a call's token counts to the day's row (reporting only; never blocks a call)."""
    if not prompt_tokens and not output_tokens:
        return
    with get_engine(url).begin() as conn:
        conn.execute(
            update(_table)
            .where(_table.c.scope == f"{service}:day", _table.c.window_start == day_start)
            .values(
                prompt_tokens=_table.c.prompt_tokens + prompt_tokens,
                output_tokens=_table.c.output_tokens + output_tokens,
                updated_at=utcnow(),
            )
        )


__all__ = ["Reservation", "record_tokens", "reserve"]

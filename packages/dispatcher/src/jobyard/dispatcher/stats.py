"""Per-queue history for the dashboard's graphs: in each time bucket of a window, how many jobs
finished and failed, and the median and 95th percentile of their run time and of their wait in
the queue (enqueued to started).

Read from `job_stats`, the roll-ups per minute and per hour the job log's writer keeps (see
jobyard.job_engine.db.jobstats): buckets of an hour or more sum hours, shorter ones minutes, so
the database sums at most a few thousand rows per queue; the percentiles are estimated from the
summed histograms. The job log keeps history across
restarts and both engines, so the graphs do too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, cast, func, select

from jobyard.job_engine.db import Base, get_engine, session_scope
from jobyard.job_engine.db.jobstats import (
    BUCKETS,
    COUNT_COLUMNS,
    RUN_COLUMNS,
    SPANS,
    WAIT_COLUMNS,
    percentile,
    period_of,
)
from jobyard.job_engine.db.models import JobStat

__all__ = ["queue_history"]


def _bucket_index(dialect: str, since: datetime, bucket: float) -> Any:
    minute = Base.metadata.tables[JobStat.__tablename__].c.period_start
    if dialect == "postgresql":
        return cast(func.floor(func.extract("epoch", minute - since) / bucket), Integer)
    # SQLite keeps naive UTC text (UTCDateTime); julianday reads it
    start = since.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
    return cast((func.julianday(minute) - func.julianday(start)) * 86400.0 / bucket, Integer)


def queue_history(
    window_seconds: float = 3600, buckets: int = 30, *, until: datetime | None = None
) -> dict[str, Any]:
    """{"since", "until", "bucket_seconds", "queues": {queue: [point per bucket]}}; a point:
    {"t" (the bucket's start), "finished", "failed", "run_p50_ms", "run_p95_ms",
    "wait_p50_ms", "wait_p95_ms"}. Every bucket is present (zero counts where nothing ran)."""
    end = until or datetime.now(UTC)
    bucket = window_seconds / buckets
    since = end - timedelta(seconds=window_seconds)
    table = Base.metadata.tables[JobStat.__tablename__]
    span = max(s for s in SPANS if s <= max(bucket, SPANS[0]))
    start = period_of(since, span)  # the period holding `since` counts, as its bucket's
    index = _bucket_index(get_engine().dialect.name, since, bucket).label("bucket")
    query = (
        select(table.c.queue, index, *[func.sum(table.c[c]).label(c) for c in COUNT_COLUMNS])
        .where(table.c.span == span, table.c.period_start >= start, table.c.period_start < end)
        .group_by(table.c.queue, index)
    )
    series: dict[str, list[dict[str, Any]]] = {}
    with session_scope() as session:
        for row in session.execute(query):
            values = row._mapping
            points = series.setdefault(values["queue"], _empty(since, bucket, buckets))
            at = min(max(int(values["bucket"]), 0), buckets - 1)
            run = [int(values[c] or 0) for c in RUN_COLUMNS]
            wait = [int(values[c] or 0) for c in WAIT_COLUMNS]
            points[at].update(
                finished=int(values["finished"] or 0), failed=int(values["failed"] or 0),
                run_p50_ms=_ms(percentile(run, 0.5)), run_p95_ms=_ms(percentile(run, 0.95)),
                wait_p50_ms=_ms(percentile(wait, 0.5)), wait_p95_ms=_ms(percentile(wait, 0.95)),
            )  # fmt: skip
    return {
        "since": since.isoformat(), "until": end.isoformat(), "bucket_seconds": bucket,
        "histogram_buckets": BUCKETS, "span_seconds": span, "queues": dict(sorted(series.items())),
    }  # fmt: skip


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _empty(since: datetime, bucket: float, buckets: int) -> list[dict[str, Any]]:
    return [
        {"t": (since + timedelta(seconds=i * bucket)).isoformat(), "finished": 0, "failed": 0,
         "run_p50_ms": None, "run_p95_ms": None, "wait_p50_ms": None, "wait_p95_ms": None}
        for i in range(buckets)
    ]  # fmt: skip

"""Per-queue history from the job log, for the dashboard's graphs: in each time bucket of a
window, how many jobs finished and failed, and the median and 95th percentile of their run time
and of their wait in the queue (enqueued to started). The job log keeps history across
restarts and both engines, so the graphs do too.

PostgreSQL aggregates in SQL, from the finished_at index alone (migration 0006 carries the
columns in it); SQLite, the embedded default, has no percentiles, so the rows of the window
are aggregated here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, text

from jobyard.job_engine.db import get_engine, session_scope
from jobyard.job_engine.db.models import JobLog

__all__ = ["queue_history"]

FAILED = ("failed", "dead")

_PG_QUERY = text("""
SELECT queue,
       floor(extract(epoch FROM finished_at - :since) / :bucket)::int AS bucket,
       count(*) AS finished,
       count(*) FILTER (WHERE state IN ('failed', 'dead')) AS failed,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS run_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS run_p95,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY wait) AS wait_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY wait) AS wait_p95
FROM (SELECT queue, finished_at, state, duration_ms,
             extract(epoch FROM started_at - enqueued_at) * 1000 AS wait
      FROM job_log WHERE finished_at >= :since AND finished_at < :until) AS window_rows
GROUP BY queue, bucket
""")


def _percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks, as PostgreSQL's percentile_cont."""
    if not values:
        return None
    values = sorted(values)
    rank = q * (len(values) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return values[low] + (values[high] - values[low]) * (rank - low)


@dataclass
class _Bucket:
    finished: int = 0
    failed: int = 0
    run: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)


def _sqlite_rows(since: datetime, until: datetime, bucket: float) -> list[tuple[Any, ...]]:
    query = select(
        JobLog.queue, JobLog.finished_at, JobLog.state, JobLog.duration_ms, JobLog.started_at,
        JobLog.enqueued_at,
    ).where(JobLog.finished_at >= since, JobLog.finished_at < until)  # fmt: skip
    groups: dict[tuple[str | None, int], _Bucket] = {}
    with session_scope() as session:
        for queue, finished_at, state, duration_ms, started_at, enqueued_at in session.execute(
            query
        ):
            if finished_at is None:  # not in the window's WHERE; for the type checker
                continue
            index = int((finished_at - since).total_seconds() // bucket)
            group = groups.setdefault((queue, index), _Bucket())
            group.finished += 1
            group.failed += state in FAILED
            if duration_ms is not None:
                group.run.append(float(duration_ms))
            if started_at is not None and enqueued_at is not None:
                group.wait.append((started_at - enqueued_at).total_seconds() * 1000)
    return [
        (queue, index, g.finished, g.failed, _percentile(g.run, 0.5), _percentile(g.run, 0.95),
         _percentile(g.wait, 0.5), _percentile(g.wait, 0.95))
        for (queue, index), g in groups.items()
    ]  # fmt: skip


def queue_history(
    window_seconds: float = 3600, buckets: int = 30, *, until: datetime | None = None
) -> dict[str, Any]:
    """{"since", "until", "bucket_seconds", "queues": {queue: [point per bucket]}}; a point:
    {"t" (the bucket's start), "finished", "failed", "run_p50_ms", "run_p95_ms",
    "wait_p50_ms", "wait_p95_ms"}. Every bucket is present (zero counts where nothing ran)."""
    end = until or datetime.now(UTC)
    bucket = window_seconds / buckets
    since = end - timedelta(seconds=window_seconds)
    if get_engine().dialect.name == "postgresql":
        with session_scope() as session:
            rows = [
                tuple(r)
                for r in session.execute(
                    _PG_QUERY, {"since": since, "until": end, "bucket": bucket}
                )
            ]
    else:
        rows = _sqlite_rows(since, end, bucket)
    series: dict[str, list[dict[str, Any]]] = {}
    for queue, index, finished, failed, run50, run95, wait50, wait95 in rows:
        points = series.setdefault(queue or "", _empty(since, bucket, buckets))
        if 0 <= index < buckets:
            points[index].update(
                finished=int(finished), failed=int(failed), run_p50_ms=_ms(run50),
                run_p95_ms=_ms(run95), wait_p50_ms=_ms(wait50), wait_p95_ms=_ms(wait95),
            )  # fmt: skip
    return {
        "since": since.isoformat(), "until": end.isoformat(), "bucket_seconds": bucket,
        "queues": dict(sorted(series.items())),
    }  # fmt: skip


def _ms(value: Any) -> float | None:
    return None if value is None else round(max(0.0, float(value)), 1)


def _empty(since: datetime, bucket: float, buckets: int) -> list[dict[str, Any]]:
    return [
        {"t": (since + timedelta(seconds=i * bucket)).isoformat(), "finished": 0, "failed": 0,
         "run_p50_ms": None, "run_p95_ms": None, "wait_p50_ms": None, "wait_p95_ms": None}
        for i in range(buckets)
    ]  # fmt: skip

"""Per-queue roll-ups of finished jobs per minute and per hour (`job_stats`), for the graphs.

Reading a week of a busy job log row by row for every graph refresh does not scale (a million
rows take seconds to sort for percentiles), so the job log's writer (joblog.upsert) adds each
job that reaches a final state to its queue's rows for that minute and that hour (SPANS), in the
same transaction:
finished, failed (failed or dead), and two histograms, run time and queue wait, with
log-spaced bounds. A graph sums the rows of the span that fits its buckets (a day of minutes at
most, a week of hours), at most a few thousand rows per queue, and a percentile is
read off the summed histogram, interpolated inside its bucket (as Prometheus'
histogram_quantile does): an estimate, good to a bucket's width.

The increments are `column = column + excluded.column` upserts: atomic on both databases, so
writers in several processes never lose one another's counts.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from jobyard.job_engine.states import FINAL_STATES, JobState, sql_literals

#: Upper bounds (ms) of the histogram buckets; the last bucket has no upper bound.
BOUNDS_MS = (
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 60_000, 150_000,
    300_000, 600_000, 1_800_000, 3_600_000,
)  # fmt: skip
BUCKETS = len(BOUNDS_MS) + 1
RUN_COLUMNS = tuple(f"run_{i}" for i in range(BUCKETS))
WAIT_COLUMNS = tuple(f"wait_{i}" for i in range(BUCKETS))
COUNT_COLUMNS = ("finished", "failed", *RUN_COLUMNS, *WAIT_COLUMNS)
FAILED_STATES = (JobState.FAILED, JobState.DEAD)
#: The roll-ups' periods, in seconds: minutes for the short windows, hours for the long ones.
SPANS = (60, 3600)


def bucket_of(ms: float) -> int:
    """The index of the first bound above `ms` (len(BOUNDS_MS): above them all)."""
    return bisect_right(BOUNDS_MS, ms)


def period_of(moment: datetime, span: int) -> datetime:
    if span == 3600:
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(second=0, microsecond=0)


def minute_of(moment: float) -> int:
    """The minute (since the epoch) of unix seconds `moment`, as the job log stores it:
    datetime.fromtimestamp rounds to the microsecond first (half to even), so a moment within
    half a microsecond of the next minute is in that minute, as the job's finished_at is."""
    fraction, whole = math.modf(moment)
    microseconds = round(fraction * 1e6)
    return (int(whole) + (microseconds >= 1_000_000) - (microseconds < 0)) // 60


#: (queue, when it finished in unix seconds, failed, run bucket, wait bucket)
Increment = tuple[str, float, bool, int | None, int | None]


def increment(
    queue: str | None,
    finished_at: float,
    state: str,
    duration_ms: float | None,
    wait_ms: float | None,
) -> Increment:
    """One finished job (`finished_at`: unix seconds)."""
    return (
        queue or "",
        finished_at,
        state in FAILED_STATES,
        bucket_of(max(0.0, duration_ms)) if duration_ms is not None else None,
        bucket_of(max(0.0, wait_ms)) if wait_ms is not None else None,
    )


def combine(increments: list[Increment]) -> list[dict[str, Any]]:
    """The increments added up per (queue, span, period): one job_stats row to add each."""
    # Alike increments (same queue, minute, outcome and buckets; a minute lies in one period of
    # every span) are counted first: a batch of thousands of jobs holds a few dozen kinds. A
    # period is kept in unix seconds until its row is made: datetimes per job cost more.
    kinds = Counter(
        (queue, minute_of(finished_at), failed, run, wait)
        for queue, finished_at, failed, run, wait in increments
    )
    merged: dict[tuple[str, int, int], dict[str, Any]] = {}
    for (queue, minute, failed, run, wait), count in kinds.items():
        for span in SPANS:
            key = (queue, span, minute * 60 // span * span)
            row = merged.get(key)
            if row is None:
                row = merged[key] = dict.fromkeys(COUNT_COLUMNS, 0)
                row.update(queue=queue, span=span, period_start=datetime.fromtimestamp(key[2], UTC))
            row["finished"] += count
            row["failed"] += failed * count
            if run is not None:
                row[RUN_COLUMNS[run]] += count
            if wait is not None:
                row[WAIT_COLUMNS[wait]] += count
    return [merged[key] for key in sorted(merged)]


def percentile(counts: list[int], q: float) -> float | None:
    """The q-quantile (ms) of a histogram of BUCKETS counts, interpolated in its bucket."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            low = BOUNDS_MS[index - 1] if index > 0 else 0
            high = BOUNDS_MS[index] if index < len(BOUNDS_MS) else 2 * BOUNDS_MS[-1]
            return float(low + (high - low) * max(0.0, rank - seen) / count)
        seen += count
    return float(BOUNDS_MS[-1])


def _cases(value_sql: str, prefix: str) -> str:
    parts = []
    for index in range(BUCKETS):
        low = f"{value_sql} >= {BOUNDS_MS[index - 1]}" if index > 0 else "true"
        high = f"{value_sql} < {BOUNDS_MS[index]}" if index < len(BOUNDS_MS) else "true"
        parts.append(f"sum(CASE WHEN {low} AND {high} THEN 1 ELSE 0 END) AS {prefix}_{index}")
    return ",\n       ".join(parts)


def backfill_sql(dialect: str, span: int) -> str:
    """An INSERT that rolls up every finished job of job_log into job_stats' rows of `span`,
    empty until then (a database migrated from before job_stats, a freshly filled log)."""
    unit = "hour" if span == 3600 else "minute"
    if dialect == "postgresql":
        minute = f"date_trunc('{unit}', finished_at)"
        wait = "(extract(epoch FROM started_at - enqueued_at) * 1000)"
    else:
        pattern = "%Y-%m-%d %H:00:00.000000" if span == 3600 else "%Y-%m-%d %H:%M:00.000000"
        minute = f"strftime('{pattern}', finished_at)"
        wait = "((julianday(started_at) - julianday(enqueued_at)) * 86400000.0)"
    columns = ", ".join(COUNT_COLUMNS)
    return f"""
INSERT INTO job_stats (queue, span, period_start, {columns})
SELECT coalesce(queue, ''), {span}, {minute},
       count(*),
       sum(CASE WHEN state IN ({sql_literals(FAILED_STATES)}) THEN 1 ELSE 0 END),
       {_cases("duration_ms", "run")},
       {_cases(wait, "wait")}
FROM job_log
WHERE finished_at IS NOT NULL AND state IN ({sql_literals(FINAL_STATES)})
GROUP BY coalesce(queue, ''), {minute}
"""

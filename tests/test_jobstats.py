"""jobstats.combine: a batch's finished jobs added up per queue, span and period, exactly."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from jobyard.job_engine.db.jobstats import (
    BUCKETS,
    COUNT_COLUMNS,
    RUN_COLUMNS,
    SPANS,
    WAIT_COLUMNS,
    Increment,
    combine,
)

START = datetime(2026, 11, 26, 21, 0, tzinfo=UTC).timestamp()
buckets = st.none() | st.integers(0, BUCKETS - 1)
#: Unix seconds: any microsecond, or a hair either side of a minute's end (rounding's edge).
finished_at = st.integers(0, 3 * 3600 * 1_000_000).map(lambda us: START + us / 1e6) | st.tuples(
    st.integers(1, 3 * 60), st.sampled_from([-6e-7, -4e-7, -2e-7, 0.0, 2e-7])
).map(lambda minute_offset: START + minute_offset[0] * 60 + minute_offset[1])
increments = st.lists(
    st.tuples(
        st.sampled_from(["default", "email", ""]),
        finished_at,
        st.booleans(),
        buckets,
        buckets,
    ),
    max_size=60,
)


def expected(jobs: list[Increment]) -> dict[tuple[str, int, datetime], dict[str, int]]:
    """Each job added to its period of every span, one at a time, in the period holding its
    finished_at as the job log stores it (a datetime: microseconds)."""
    rows: dict[tuple[str, int, datetime], dict[str, int]] = {}
    for queue, finished_at, failed, run, wait in jobs:
        stored = datetime.fromtimestamp(finished_at, UTC)
        for span in SPANS:
            seconds = int(stored.timestamp()) // span * span
            key = (queue, span, datetime.fromtimestamp(seconds, UTC))
            row = rows.setdefault(key, dict.fromkeys(COUNT_COLUMNS, 0))
            row["finished"] += 1
            row["failed"] += int(failed)
            if run is not None:
                row[RUN_COLUMNS[run]] += 1
            if wait is not None:
                row[WAIT_COLUMNS[wait]] += 1
    return rows


@given(increments)
def test_combine_counts_every_job_once_in_every_span(jobs: list[Increment]) -> None:
    combined = combine(jobs)
    by_key = {(r["queue"], r["span"], r["period_start"]): r for r in combined}
    assert len(by_key) == len(combined)  # one row per (queue, span, period)
    want = expected(jobs)
    assert set(by_key) == set(want)
    for key, row in by_key.items():
        assert {c: row[c] for c in COUNT_COLUMNS} == want[key], key


def test_a_job_finished_within_half_a_microsecond_of_a_minute_counts_in_the_next() -> None:
    """Its finished_at rounds up to the next minute (datetime keeps microseconds): its stats
    go there too, not to the minute its unix seconds fall in."""
    end_of_minute = START + 60 - 2e-7
    assert datetime.fromtimestamp(end_of_minute, UTC).second == 0
    (minute, hour) = combine([("default", end_of_minute, False, None, None)])
    assert minute["period_start"] == datetime.fromtimestamp(START + 60, UTC)
    assert hour["period_start"] == datetime.fromtimestamp(START, UTC)

"""jobstats.combine: a batch's finished jobs added up per queue, span and period, exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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

START = datetime(2026, 11, 26, 21, 0, tzinfo=UTC)
buckets = st.none() | st.integers(0, BUCKETS - 1)
increments = st.lists(
    st.tuples(
        st.sampled_from(["default", "email", ""]),
        st.integers(0, 3 * 3600 * 1000).map(lambda ms: START + timedelta(milliseconds=ms)),
        st.booleans(),
        buckets,
        buckets,
    ),
    max_size=60,
)


def expected(jobs: list[Increment]) -> dict[tuple[str, int, datetime], dict[str, int]]:
    """Each job added to its period of every span, one at a time."""
    rows: dict[tuple[str, int, datetime], dict[str, int]] = {}
    for queue, finished_at, failed, run, wait in jobs:
        for span in SPANS:
            seconds = int(finished_at.timestamp()) // span * span
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

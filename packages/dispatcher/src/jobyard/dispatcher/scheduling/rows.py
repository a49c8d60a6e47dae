"""What the scheduler's pieces share about schedule_ticks rows and the jobs they start."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import CursorResult, Result

from jobyard.job_engine.states import UNFINISHED_STATES

#: A tick's job in one of these states counts as running (the overlap policies).
ACTIVE_JOB_STATES = UNFINISHED_STATES
#: Tick rows still to dispatch.
OPEN_TICK_STATES = ("pending", "buffered")
#: Ticks one schedule claims in one pass, and rows one pass works through; a longer catch-up
#: continues in the next pass.
BATCH = 500
MICROSECOND = timedelta(microseconds=1)


def rowcount(result: Result[*tuple[Any, ...]]) -> int:
    """Rows an UPDATE matched. Session.execute is typed as returning a plain Result, but for an
    UPDATE it is the driver's CursorResult, which alone has a rowcount."""
    assert isinstance(result, CursorResult)
    return result.rowcount

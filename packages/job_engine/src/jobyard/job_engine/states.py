"""A job's states, spelled once. The job log, every engine and the HTTP API use these strings;
jobyard.lua keeps its own copies, checked against this enum by tests/test_job_states.py."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"  # dispatched, not started (or waiting out a dispatch delay)
    RUNNING = "running"  # an attempt is under way (or sleeping durably between steps)
    RETRYING = "retrying"  # an attempt failed; the next one waits out its backoff
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a permanent error: not retried
    DEAD = "dead"  # every attempt failed
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


#: States a job never leaves (but by a replay, which starts a new run under the same id).
FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED})
#: States of a job that has not finished.
UNFINISHED_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)


def sql_literals(states: Iterable[JobState]) -> str:
    """`'failed', 'dead'`: states as SQL string literals, for an `IN (...)` in a constant query."""
    return ", ".join(f"'{state.value}'" for state in sorted(states))

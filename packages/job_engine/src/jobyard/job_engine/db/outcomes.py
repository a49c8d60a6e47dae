"""How some jobs ended, read from the job log: the one place that knows every job's ending
whichever engine ran it (and after a move between engines), in one query for many jobs. Read by
jobs that wait for other jobs (jobyard.job_engine.waits)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import FINAL_JOB_STATES, JobLog
from jobyard.job_engine.states import UNFINISHED_STATES, JobState

#: Ids per `IN (...)`: well under every driver's parameter limit.
CHUNK = 1000


def _chunks(job_ids: list[str]) -> list[list[str]]:
    return [job_ids[i : i + CHUNK] for i in range(0, len(job_ids), CHUNK)]


def count_ended(job_ids: list[str]) -> int:
    """How many of `job_ids` (distinct) the job log shows in a final state."""
    ended = 0
    with session_scope() as session:
        for chunk in _chunks(job_ids):
            query = select(func.count()).where(
                JobLog.job_id.in_(chunk), JobLog.state.in_(FINAL_JOB_STATES)
            )
            ended += session.execute(query).scalar_one()
    return ended


def ended_outcomes(job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The ended ones of `job_ids`: id -> {"job_id", "state", "result", "error"} (result only
    for a job that succeeded, error only for one that did not)."""
    found: dict[str, dict[str, Any]] = {}
    with session_scope() as session:
        for chunk in _chunks(job_ids):
            query = select(JobLog.job_id, JobLog.state, JobLog.result, JobLog.error_message).where(
                JobLog.job_id.in_(chunk), JobLog.state.in_(FINAL_JOB_STATES)
            )
            for row in session.execute(query):
                succeeded = row.state == JobState.SUCCEEDED
                found[row.job_id] = {
                    "job_id": row.job_id,
                    "state": row.state,
                    "result": row.result if succeeded else None,
                    "error": None if succeeded else row.error_message,
                }
    return found


def unfinished_children(parent_id: str) -> list[str]:
    """The ids of `parent_id`'s children (and theirs: `<parent>:child...`, see
    jobyard.job_engine.children.child_job_id) the job log shows not ended. Job ids hold no
    LIKE wildcard (the dispatcher's id pattern), so the prefix is matched as written."""
    query = select(JobLog.job_id).where(
        JobLog.job_id.like(f"{parent_id}:child%"), JobLog.state.in_(UNFINISHED_STATES)
    )
    with session_scope() as session:
        return list(session.execute(query).scalars())

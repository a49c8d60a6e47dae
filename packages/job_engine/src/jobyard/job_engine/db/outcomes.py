"""How some jobs ended, read from the job log: the one place that knows every job's ending
whichever engine ran it (and after a move between engines), in one query for many jobs. Read by
jobs that wait for other jobs (jobyard.job_engine.waits)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select

from jobyard.job_engine import crypto
from jobyard.job_engine.children import START_SUFFIX, child_ids
from jobyard.job_engine.context import CHILDREN_STEP_PREFIX
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import FINAL_JOB_STATES, JobLog, JobStep
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
                    # Sealed with encryption on, as the job log keeps them (crypto).
                    "result": crypto.unseal(row.job_id, row.result) if succeeded else None,
                    "error": None if succeeded else crypto.unseal(row.job_id, row.error_message),
                }
    return found


def unfinished_children(parent_id: str) -> list[str]:
    """The ids of `parent_id`'s children (and theirs: `<parent>:child...`, see
    jobyard.job_engine.children.child_job_id) that have not ended: those the job log shows
    unfinished, and those of its recorded fan-outs (the step journal's `<wait>:start` counts)
    the job log does not show yet (its rows follow a dispatch by up to its write interval).
    Job ids hold no LIKE wildcard (the dispatcher's id pattern): the prefix matches as written."""
    logged = select(JobLog.job_id, JobLog.state).where(JobLog.job_id.like(f"{parent_id}:child%"))
    started = select(JobStep.step, JobStep.result).where(
        JobStep.job_id == parent_id,
        JobStep.step.like(f"{CHILDREN_STEP_PREFIX}%{START_SUFFIX}"),
    )
    with session_scope() as session:
        known = {row.job_id: row.state for row in session.execute(logged)}
        fan_outs = list(session.execute(started))
    unfinished = [job_id for job_id, state in known.items() if state in UNFINISHED_STATES]
    for step, result in fan_outs:
        fan_in = int(step.removeprefix(CHILDREN_STEP_PREFIX).removesuffix(START_SUFFIX))
        unfinished += [
            job_id
            for job_id in child_ids(
                parent_id, fan_in, json.loads(crypto.unseal_json(parent_id, result))
            )
            if job_id not in known
        ]  # fmt: skip
    return unfinished

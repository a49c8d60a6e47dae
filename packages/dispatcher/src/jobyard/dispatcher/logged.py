"""A job's status from the job log, for a job neither engine has a record of any more: its Redis
record expired (JOBYARD_RECORD_RETENTION) or was lost with a Redis that came back empty. The job
log keeps finished jobs longer than the engines do, so `get_job` still answers for them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from jobyard.dispatcher.models import JobStatus
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.joblog.sealed import opened
from jobyard.job_engine.db.models import FINAL_JOB_STATES, JobLog
from jobyard.job_engine.states import JobState


def logged_status(job_id: str) -> JobStatus | None:
    """The job's final status as the job log has it; None if it has none (or no database)."""
    query = select(
        JobLog.engine, JobLog.state, JobLog.attempts, JobLog.name, JobLog.result,
        JobLog.error_message, JobLog.progress,
    ).where(JobLog.job_id == job_id, JobLog.state.in_(FINAL_JOB_STATES))  # fmt: skip
    try:
        with session_scope() as session:
            row = session.execute(query).first()
    except SQLAlchemyError:  # no job log here: the engines' answer stands
        return None
    if row is None or row.engine not in ("dramatiq", "temporal"):
        return None
    values = opened(job_id, dict(row._mapping))
    return JobStatus(
        job_id=job_id,
        engine=row.engine,
        state=JobState(row.state),
        attempts=row.attempts,
        name=row.name,
        result=values["result"] if row.state == JobState.SUCCEEDED else None,
        error=values["error_message"],
        progress=values["progress"],
    )

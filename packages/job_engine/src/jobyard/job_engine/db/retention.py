"""How long the job log remembers: `jobyard db prune` deletes finished jobs older than the
retention (JOBYARD_JOB_LOG_RETENTION_DAYS), in batches, so a big log prunes without one huge
transaction. A pruned job id is forgotten by the job id registry too: dispatching it again
after the retention starts a new job, as an idempotency key's window ends. Its kept step results
(`job_steps`) go with it, and so do events (`sent_events`) sent before the retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from jobyard.job_engine import env
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import (
    FINAL_JOB_STATES,
    JobEvent,
    JobLog,
    JobOwner,
    JobStat,
    JobStep,
    SentEvent,
)

BATCH = 5000


def prune_job_log(older_than_days: float | None = None, *, url: str | None = None) -> int:
    """Deletes finished jobs that finished more than `older_than_days` ago; returns how many."""
    days = env.get_float(env.JOB_LOG_RETENTION_DAYS) if older_than_days is None else older_than_days
    if days < 0:
        raise ValueError(f"retention must be >= 0 days, not {days}")
    cutoff = datetime.now(UTC) - timedelta(days=days)
    pruned = 0
    while True:
        with session_scope(url) as session:
            ids = list(
                session.scalars(
                    select(JobLog.job_id)
                    .where(JobLog.state.in_(FINAL_JOB_STATES), JobLog.finished_at < cutoff)
                    .limit(BATCH)
                )
            )
            if not ids:
                break
            session.execute(delete(JobLog).where(JobLog.job_id.in_(ids)))
            session.execute(delete(JobEvent).where(JobEvent.job_id.in_(ids)))
            session.execute(delete(JobOwner).where(JobOwner.job_id.in_(ids)))
            session.execute(delete(JobStep).where(JobStep.job_id.in_(ids)))
            pruned += len(ids)
    with session_scope(url) as session:  # claims and steps whose job never reached the log
        session.execute(delete(JobOwner).where(JobOwner.claimed_at < cutoff))
        session.execute(
            delete(JobStep).where(
                JobStep.recorded_at < cutoff, JobStep.job_id.not_in(select(JobLog.job_id))
            )
        )
    with session_scope(url) as session:  # the graphs' roll-ups are history as long as the log
        session.execute(delete(JobStat).where(JobStat.period_start < cutoff))
        # events for ctx.wait_for_event: only a wait begun before the cutoff could take them
        session.execute(delete(SentEvent).where(SentEvent.sent_at < cutoff.timestamp()))
    return pruned

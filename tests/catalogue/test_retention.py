"""`jobyard db prune`: finished jobs past the retention leave the job log and the id registry;
unfinished and recent ones stay. On both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import JobLog, JobOwner
from jobyard.job_engine.db.retention import prune_job_log


def test_prune_keeps_unfinished_and_recent_jobs(database: str) -> None:
    url = database
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=40), now - timedelta(days=2)
    rows = {
        "old-done": ("succeeded", old),
        "old-dead": ("dead", old),
        "recent-done": ("succeeded", recent),
        "old-running": ("running", None),
    }
    with session_scope(url) as session:
        for job_id, (state, finished_at) in rows.items():
            session.add(JobLog(job_id=job_id, name="system.echo", state=state,
                               enqueued_at=old, finished_at=finished_at))  # fmt: skip
            session.add(JobOwner(job_id=job_id, engine="dramatiq", name="system.echo",
                                 payload_digest="x", claimed_at=old))  # fmt: skip
    assert prune_job_log(30, url=url) == 2
    with session_scope(url) as session:
        assert sorted(session.scalars(select_ids(JobLog))) == ["old-running", "recent-done"]
        assert list(session.scalars(select_ids(JobOwner))) == []  # claims older than 30 days
    with pytest.raises(ValueError, match="retention"):
        prune_job_log(-1, url=url)


def select_ids(model: type[JobLog] | type[JobOwner]):
    from sqlalchemy import select

    return select(model.job_id)

"""`jobyard db prune`: finished jobs past the retention leave the job log and the id registry;
unfinished and recent ones stay. On both databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import JobLog, JobOwner, JobStep, SentEvent
from jobyard.job_engine.db.retention import prune_job_log

JOBYARD = str(Path(sys.executable).parent / "jobyard")


def _add_jobs(url: str) -> None:
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
            session.add(JobStep(job_id=job_id, step="s0", result="1", recorded_at=old))
        # the kept step of a job that never reached the log, past the retention
        session.add(JobStep(job_id="never-logged", step="s0", result="1", recorded_at=old))
        for event_id, sent in (("old-event", old), ("recent-event", recent)):
            session.add(SentEvent(name=event_id, data="{}", sent_at=sent.timestamp()))


def test_prune_keeps_unfinished_and_recent_jobs(database: str) -> None:
    url = database
    _add_jobs(url)
    assert prune_job_log(30, url=url) == 2
    with session_scope(url) as session:
        assert sorted(session.scalars(select_ids(JobLog))) == ["old-running", "recent-done"]
        assert list(session.scalars(select_ids(JobOwner))) == []  # claims older than 30 days
        assert sorted(session.scalars(select_ids(JobStep))) == ["old-running", "recent-done"]
        assert list(session.scalars(select(SentEvent.name))) == ["recent-event"]
    with pytest.raises(ValueError, match="retention"):
        prune_job_log(-1, url=url)


def test_jobyard_db_prune_reads_the_retention_from_the_environment(database: str) -> None:
    """The command an operator runs from cron: JOBYARD_JOB_LOG_RETENTION_DAYS picks the age."""
    _add_jobs(database)

    def prune(*args: str, days: str) -> subprocess.CompletedProcess[str]:
        env = os.environ | {"DATABASE_URL": database, "JOBYARD_JOB_LOG_RETENTION_DAYS": days}
        return subprocess.run(
            [JOBYARD, "db", "prune", *args], env=env, capture_output=True, text=True, timeout=60
        )

    kept = prune(days="45")  # nothing finished 45 days ago
    assert (kept.returncode, json.loads(kept.stdout)) == (0, {"pruned": 0}), kept.stderr
    done = prune(days="30")
    assert (done.returncode, json.loads(done.stdout)) == (0, {"pruned": 2}), done.stderr
    with session_scope(database) as session:
        assert sorted(session.scalars(select_ids(JobLog))) == ["old-running", "recent-done"]
    recent = prune("--older-than-days", "1", days="30")  # the option beats the environment
    assert json.loads(recent.stdout) == {"pruned": 1}, recent.stderr
    bad = prune(days="-1")
    assert bad.returncode == 2 and "retention must be >= 0" in bad.stderr


def select_ids(model: type[JobLog] | type[JobOwner] | type[JobStep]):
    from sqlalchemy import select

    return select(model.job_id)

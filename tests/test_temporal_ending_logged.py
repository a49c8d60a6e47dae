"""A Temporal job's ending is in the job log by the time Temporal has the job final: a temporal
worker killed right after a job ended does not take the ending with it. Before, the ending waited
in the worker's writer buffer for its next interval, and `make soak` (issue 29) met one job final
in Temporal and never final in the job log. Real `jobyard temporal-worker`, real PostgreSQL."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from jobyard.job_engine.db import dispose_engines, get_engine
from jobyard.job_engine.db.joblog import reset_writer
from jobyard.job_engine.db.models import JobLog
from tests.support import migrated_pg_database, start_engines_patiently


@pytest.fixture
def ending_db_url() -> Iterator[str]:
    with migrated_pg_database("jobyard_test_ending") as url:
        yield url
        dispose_engines(url)


def test_an_ending_on_temporal_survives_its_worker_killed_at_once(
    engines, ending_db_url, monkeypatch
):
    """Every process's writer waits 600 s between flushes: only what a job's ending writes at
    once reaches the log before the temporal worker is SIGKILLed (no exit flush either)."""
    monkeypatch.setenv("DATABASE_URL", ending_db_url)
    monkeypatch.setenv("JOBYARD_JOB_LOG_INTERVAL", "600")
    reset_writer()
    start_engines_patiently(engines, temporal=True)
    handles = [engines.dispatch("temporal", "system.echo", {"i": i}) for i in range(3)]
    for handle in handles:
        assert engines.wait(handle.job_id).state == "succeeded"
    worker = engines.temporal_worker
    worker.signal_group(signal.SIGKILL)
    worker.proc.wait(30)

    table = JobLog.__table__
    ids = [handle.job_id for handle in handles]
    with get_engine(ending_db_url).connect() as connection:
        rows = connection.execute(
            select(table.c.job_id, table.c.state, table.c.engine).where(table.c.job_id.in_(ids))
        ).all()
    assert sorted((state, engine) for _, state, engine in rows) == [
        ("succeeded", "temporal")
    ] * len(ids), rows
    reset_writer()  # this process's "queued", while its database is there

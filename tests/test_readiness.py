"""Library use is quiet and explicit: a dispatching process says in one line what it is missing
(settings, the job log database, its migrations), and the job log writer does not repeat the
same error every flush."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from jobyard.job_engine.db import dispose_engines, session_scope
from jobyard.job_engine.db import joblog as joblog_module
from jobyard.job_engine.db.joblog import JobLogWriter
from jobyard.job_engine.db.migrate import upgrade
from jobyard.job_engine.db.models import JobLog
from jobyard.job_engine.db.readiness import check_setup
from tests.support import free_port, wait_for


@pytest.fixture
def web_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A web app's process: its own directory, none of jobyard's settings."""
    for name in ("REDIS_URL", "TEMPORAL_ADDRESS", "DATABASE_URL", "JOBYARD_JOB_LOG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    joblog_module.reset_writer()
    yield tmp_path
    joblog_module.reset_writer()


def test_an_unconfigured_process_says_what_is_missing_in_one_line(
    web_process: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="jobyard"):
        line = check_setup()
    assert line is not None and "\n" not in line
    assert "REDIS_URL, TEMPORAL_ADDRESS, DATABASE_URL unset" in line
    assert f"{web_process / '.jobyard' / 'jobyard.db'} does not exist" in line
    assert [r.getMessage() for r in caplog.records] == [line]
    assert not (web_process / ".jobyard").exists(), "the check must not create the database"


def test_an_unmigrated_database_is_named(web_process: Path, monkeypatch: pytest.MonkeyPatch):
    url = f"sqlite:///{web_process / 'app.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:7233")
    try:
        assert check_setup() == (
            f"jobyard: the database at {url} is not migrated: run `jobyard db upgrade`"
        )
        upgrade(url)
        assert check_setup() is None
        # Without a job log, no database is needed at all.
        monkeypatch.setenv("JOBYARD_JOB_LOG", "false")
        monkeypatch.delenv("DATABASE_URL")
        joblog_module.reset_writer()
        assert check_setup() is None
    finally:
        dispose_engines(url)


def test_an_unreachable_database_is_named_without_its_password(
    web_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://jobyard:s3cret@127.0.0.1:{free_port()}/x")
    line = check_setup()
    assert line is not None and "\n" not in line
    assert "is unreachable: connection failed" in line
    assert "s3cret" not in line and "***" in line


def test_a_failing_job_log_flush_is_logged_once_not_every_interval(
    web_process: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{web_process / 'unmigrated.db'}"
    writer = JobLogWriter(url, interval=0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="jobyard.joblog"):
            writer.record("job-1", name="system.echo", state="queued")
            time.sleep(1.5)  # some 30 failing flushes
            failures = [r.getMessage() for r in caplog.records]
            assert len(failures) == 1, failures
            assert "no such table: job_log (run `jobyard db upgrade`)" in failures[0]
            assert "\n" not in failures[0]

            upgrade(url)  # the operator migrates: the kept event is written, and it says so
            messages = lambda: [r.getMessage() for r in caplog.records]  # noqa: E731
            wait_for(lambda: "job log flush works again" in messages(), timeout=10)
            # A flush may meet a half-migrated table: a new reason is logged, once.
            assert len(messages()) == len(set(messages())) <= 4, messages()
        with session_scope(url) as session:
            assert session.scalars(select(JobLog.state).where(JobLog.job_id == "job-1")).all() == [
                "queued"
            ]
    finally:
        dispose_engines(url)

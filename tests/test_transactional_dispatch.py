"""Dispatch inside the caller's transaction (`dispatch_job(..., connection=)`) and the relay
that sends committed outbox rows, on SQLite and PostgreSQL, with real worker processes: a job
exists if and only if the transaction that dispatched it committed, and runs once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from jobyard.dispatcher import (
    DispatchRequest,
    IdempotencyConflictError,
    JobNotFoundError,
    adispatch_job,
    dispatch_job,
    dispatch_many,
    get_job,
    reset_dispatcher,
)
from jobyard.dispatcher.errors import JobLogBacklogError
from jobyard.job_engine import InvalidPayloadError
from jobyard.job_engine.db import dispose_engines, get_engine, joblog
from jobyard.job_engine.db.dispatch_outbox import OutboxDatabaseError, OutboxMissingError
from jobyard.job_engine.db.migrate import upgrade
from tests.engines import Engines
from tests.support import ROOT, migrated_pg_database, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with migrated_pg_database("jobyard_test_txn") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobyard.db'}"
        upgrade(url)
        return url
    return request.getfixturevalue("pg_url")


@pytest.fixture
def on_database(database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """DATABASE_URL set to `database` for this process (and the workers a test starts)."""
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("JOBYARD_JOB_MODULES", "tests.jobs")
    empty(database)
    reset_dispatcher()
    joblog.reset_writer()
    yield database
    reset_dispatcher()
    joblog.reset_writer()


def empty(url: str) -> None:
    """The module's PostgreSQL database is shared by its tests: each starts with no jobs."""
    with get_engine(url).begin() as connection:
        for table in ("dispatch_outbox", "job_events", "job_log", "job_owners"):
            connection.execute(text(f"DELETE FROM {table}"))


def count_payload(tmp_path: Path, key: str) -> dict[str, str]:
    return {"marker_dir": str(tmp_path), "key": key}


def outbox_ids(url: str) -> list[str]:
    with get_engine(url).connect() as connection:
        return list(connection.execute(text("SELECT job_id FROM dispatch_outbox")).scalars())


def logged(url: str, job_id: str) -> list[tuple[str, str | None]]:
    """The job's job_log row (state, engine), if any."""
    with get_engine(url).connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                text("SELECT state, engine FROM job_log WHERE job_id = :id"), {"id": job_id}
            )
        ]


def runs(tmp_path: Path, key: str) -> int:
    path = tmp_path / key
    return len(path.read_text().splitlines()) if path.exists() else 0


# ---- the caller's side: no engine, no worker -------------------------------------------------


def test_a_rolled_back_transaction_leaves_nothing(on_database: str, tmp_path: Path) -> None:
    engine = get_engine()
    with engine.connect() as connection:
        handle = dispatch_job("test.count", count_payload(tmp_path, "a"), connection=connection)
        assert handle.engine == "outbox" and not handle.duplicate
        # Visible to this process while the transaction is open, to no one else.
        assert get_job(handle.job_id).engine == "outbox"
        assert get_job(handle.job_id).state == "queued"
        assert outbox_ids(on_database) == [] or engine.dialect.name == "sqlite"
        connection.rollback()
    assert outbox_ids(on_database) == []
    from jobyard.dispatcher import transactional

    assert transactional.open_status(handle.job_id) is None
    assert transactional.committed_status(handle.job_id) is None


def test_commit_leaves_one_row_and_get_job_says_queued_in_the_outbox(
    on_database: str, tmp_path: Path
) -> None:
    with Session(get_engine()) as session, session.begin():
        handle = dispatch_job("test.count", count_payload(tmp_path, "b"), connection=session)
        chosen = dispatch_job(
            "test.count", count_payload(tmp_path, "c"), connection=session, job_id="order-7"
        )
        again = dispatch_job(
            "test.count", count_payload(tmp_path, "c"), connection=session, job_id="order-7"
        )
        assert again.duplicate and not chosen.duplicate
        with pytest.raises(IdempotencyConflictError):
            dispatch_job("system.echo", {"message": "x"}, connection=session, job_id="order-7")
    assert sorted(outbox_ids(on_database)) == sorted([handle.job_id, "order-7"])
    from jobyard.dispatcher import transactional

    status = transactional.committed_status(handle.job_id)
    assert status is not None and (status.engine, status.state) == ("outbox", "queued")
    assert logged(on_database, handle.job_id) == []  # the relay writes it, with the engine


def test_a_rolled_back_savepoint_takes_its_jobs_with_it(on_database: str, tmp_path: Path) -> None:
    with get_engine().begin() as connection:
        kept = dispatch_job("test.count", count_payload(tmp_path, "k"), connection=connection)
        savepoint = connection.begin_nested()
        dropped = dispatch_many(
            [("test.count", count_payload(tmp_path, "d")), ("nope.job", {})],
            connection=connection,
        )
        savepoint.rollback()
    assert isinstance(dropped[1], Exception)
    assert outbox_ids(on_database) == [kept.job_id]


def test_a_relay_deletes_only_the_rows_it_read_when_their_ids_were_given_again(
    on_database: str, tmp_path: Path
) -> None:
    """Two relays read the same row; one sends and deletes it, the table is empty, and SQLite
    gives the next committed row the same id. The slower relay's delete must leave that row."""
    from jobyard.job_engine.db import dispatch_outbox as outbox

    engine = get_engine()
    with engine.begin() as connection:
        first = dispatch_job("test.count", count_payload(tmp_path, "d"), connection=connection)
    with engine.connect() as connection:
        read_by_both = outbox.peek(connection, 10, time.time())
    with engine.begin() as connection:
        assert outbox.delete(connection, read_by_both) == {read_by_both[0].id}
    with engine.begin() as connection:
        second = dispatch_job("test.count", count_payload(tmp_path, "e"), connection=connection)
    with engine.begin() as connection:
        assert outbox.delete(connection, read_by_both) == set()
    assert outbox_ids(on_database) == [second.job_id] != [first.job_id]


def test_bad_input_raises_before_anything_is_written(on_database: str) -> None:
    with get_engine().begin() as connection:
        with pytest.raises(InvalidPayloadError):
            dispatch_job("test.count", {"marker_dir": 3}, connection=connection)
        with pytest.raises(TypeError, match="SQLAlchemy Connection or Session"):
            dispatch_job("test.count", {}, connection=object())
    assert outbox_ids(on_database) == []


def test_an_unmigrated_database_names_jobyard_db_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'bare.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    with (
        get_engine(url).begin() as connection,
        pytest.raises(OutboxMissingError, match="jobyard db upgrade"),
    ):
        dispatch_job("test.count", count_payload(tmp_path, "x"), connection=connection)
    dispose_engines(url)


def test_a_connection_to_another_database_is_refused(on_database: str, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade(other)
    with (
        create_engine(other).begin() as connection,
        pytest.raises(OutboxDatabaseError, match="DATABASE_URL"),
    ):
        dispatch_job("test.count", count_payload(tmp_path, "x"), connection=connection)


def test_async_connection_and_session(pg_url: str, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:  # fmt: skip
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    monkeypatch.setenv("DATABASE_URL", pg_url)

    async def dispatch_both() -> tuple[str, str]:
        engine = create_async_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            async with engine.begin() as connection:
                one = await adispatch_job("test.count", count_payload(tmp_path, "y"),
                                          connection=connection)  # fmt: skip
            async with AsyncSession(engine) as session, session.begin():
                two = await adispatch_job("test.count", count_payload(tmp_path, "z"),
                                          connection=session)  # fmt: skip
            async with engine.connect() as connection:
                dropped = await adispatch_job("test.count", count_payload(tmp_path, "w"),
                                              connection=connection)  # fmt: skip
                await connection.rollback()
        finally:
            await engine.dispose()
        return one.job_id, two.job_id, dropped.job_id

    one, two, dropped = asyncio.run(dispatch_both())
    waiting = outbox_ids(pg_url)
    assert one in waiting and two in waiting and dropped not in waiting


# ---- with the relay and real workers ---------------------------------------------------------


def test_committed_jobs_run_once_rolled_back_ones_never(
    engines: Engines, on_database: str, tmp_path: Path
) -> None:
    """The relay of a real `jobyard worker` sends what committed, and only that. (`engines`
    first: its environment is the test's, then DATABASE_URL is `on_database`'s.)"""
    engines.start_worker()
    engine = get_engine()
    with engine.begin() as connection:
        committed = dispatch_job("test.count", count_payload(tmp_path, "commit"),
                                 connection=connection)  # fmt: skip
        savepoint = connection.begin_nested()
        in_savepoint = dispatch_job("test.count", count_payload(tmp_path, "savepoint"),
                                    connection=connection)  # fmt: skip
        savepoint.rollback()
        many = dispatch_many([DispatchRequest("test.count", count_payload(tmp_path, f"m{i}"))
                              for i in range(20)], connection=connection)  # fmt: skip
    with engine.connect() as connection:
        rolled_back = dispatch_job("test.count", count_payload(tmp_path, "rollback"),
                                   connection=connection)  # fmt: skip
        connection.rollback()

    status = engines.wait(committed.job_id)
    assert status.state == "succeeded" and status.engine == "dramatiq"
    for handle in many:
        assert engines.wait(handle.job_id).state == "succeeded"
    try:
        wait_for(lambda: logged(on_database, committed.job_id) == [("succeeded", "dramatiq")])
    except AssertionError:
        raise AssertionError(f"{logged(on_database, committed.job_id)}\n{engines.logs()}") from None
    assert outbox_ids(on_database) == []
    assert runs(tmp_path, "commit") == 1
    assert all(runs(tmp_path, f"m{i}") == 1 for i in range(20))
    for never in (in_savepoint, rolled_back):
        with pytest.raises(JobNotFoundError):
            get_job(never.job_id)
        assert logged(on_database, never.job_id) == []
    assert runs(tmp_path, "savepoint") == runs(tmp_path, "rollback") == 0
    with engine.connect() as connection:  # one history, starting with its dispatch
        events = connection.execute(
            text("SELECT seq, state FROM job_events WHERE job_id = :id AND kind = 'state'"
                 " ORDER BY seq"), {"id": committed.job_id},
        ).all()  # fmt: skip
    assert [state for _, state in events] == ["queued", "running", "succeeded"]


def test_a_relay_killed_mid_batch_loses_nothing_and_runs_nothing_twice(
    engines: Engines, pg_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A relay SIGKILLed after it sent a batch, before it committed: the rows come back, the
    next relay sends them again, and each job runs once (the engines dedupe the ids)."""
    monkeypatch.setenv("DATABASE_URL", pg_url)
    empty(pg_url)
    monkeypatch.setenv("JOBYARD_DISPATCH_RELAY", "false")  # the workers' relays wait their turn
    reset_dispatcher()
    engines.start_worker()
    with get_engine().begin() as connection:
        handles = dispatch_many([("test.count", count_payload(tmp_path, f"k{i}"))
                                 for i in range(300)], connection=connection)  # fmt: skip
    killer = subprocess.run(
        [sys.executable, "-m", "tests.relay_killer"], cwd=ROOT, env=dict(os.environ),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killer.returncode == -signal.SIGKILL, killer.stdout + killer.stderr
    assert len(outbox_ids(pg_url)) == 300  # rolled back: every row is back
    # The first send reached Dramatiq: the jobs run while their rows wait to be sent again.
    wait_for(lambda: sum(runs(tmp_path, f"k{i}") for i in range(300)) == 300, timeout=90)
    monkeypatch.setenv("JOBYARD_DISPATCH_RELAY", "true")
    engines.start_worker(processes=1)  # its relay sends the batch again
    wait_for(lambda: outbox_ids(pg_url) == [], timeout=60)
    for handle in handles:
        assert engines.wait(handle.job_id).state == "succeeded"
    assert [runs(tmp_path, f"k{i}") for i in range(300)] == [1] * 300
    with get_engine().connect() as connection:
        rows = connection.execute(
            text("SELECT count(*) FROM job_log WHERE job_id = ANY(:ids)"),
            {"ids": [h.job_id for h in handles]},
        ).scalar()
        queued = connection.execute(
            text("SELECT count(*) FROM job_events WHERE state = 'queued' AND job_id = ANY(:ids)"),
            {"ids": [h.job_id for h in handles]},
        ).scalar()
    assert rows == 300 and queued == 300


# ---- the non-transactional path while the database is down -----------------------------------


def test_dispatch_refuses_once_the_unwritten_job_log_reaches_its_limit(
    jobyard_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No engine worker: the jobs go to Temporal; the job log's database is unreachable."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/nowhere")
    monkeypatch.setenv("JOBYARD_JOB_LOG_INTERVAL", "3600")
    monkeypatch.setenv("JOBYARD_JOB_LOG_DISPATCH_LIMIT", "3")
    monkeypatch.setenv("USE_DRAMATIQ", "false")
    reset_dispatcher()
    joblog.reset_writer()
    for _ in range(3):
        dispatch_job("system.echo", {"message": "hi"})
    with pytest.raises(JobLogBacklogError, match="JOBYARD_JOB_LOG_DISPATCH_LIMIT=3"):
        dispatch_job("system.echo", {"message": "refused"})
    with pytest.raises(JobLogBacklogError):
        dispatch_many([("system.echo", {"message": "refused"})] * 2)
    writer = joblog.writer()
    assert writer is not None and writer.backlog() == 3
    monkeypatch.setenv("DATABASE_URL", jobyard_env["DATABASE_URL"])  # the database is back
    writer.flush()
    assert writer.backlog() == 0
    dispatch_job("system.echo", {"message": "accepted again"})


# ---- Django ----------------------------------------------------------------------------------


def test_a_django_view_that_raises_after_enqueueing_in_atomic_enqueues_nothing(
    engines: Engines, on_database: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`JobyardBackend` with OPTIONS transactional, on Django's own connection: the task of the
    view that commits runs once, the one of the view that raises never."""
    import json

    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "tests.django_app.settings")  # the workers'
    monkeypatch.setenv("JOBYARD_JOB_MODULES", "tests.jobs,jobyard.django.jobs")
    engines.start_worker(queues="default")
    views = subprocess.run(
        [sys.executable, "-m", "tests.django_app.transactional_views", str(tmp_path)],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert views.returncode == 0, views.stdout + views.stderr
    ids = json.loads(views.stdout.strip().splitlines()[-1])
    assert ids["status"] == 500
    assert engines.wait(ids["committed"]).state == "succeeded"
    assert runs(tmp_path, "django-committed") == 1
    assert outbox_ids(on_database) == []
    with pytest.raises(JobNotFoundError):
        get_job(ids["raised"])
    assert logged(on_database, ids["raised"]) == []
    assert runs(tmp_path, "django-raised") == 0


def test_a_debounced_job_is_refused_in_a_transaction(on_database: str) -> None:
    # Its burst is decided in the permit store at dispatch, outside the caller's transaction.
    import tests.flow_jobs  # noqa: F401  (declares test.flow_debounce)
    from jobyard.dispatcher.transactional import DebouncedInTransactionError

    payload = {"marker_dir": "m", "doc": "d1", "value": 1}
    with get_engine().begin() as connection:
        with pytest.raises(DebouncedInTransactionError, match="after the transaction commits"):
            dispatch_job("test.flow_debounce", payload, connection=connection)
        results = dispatch_many([("test.flow_debounce", payload)], connection=connection)
        assert isinstance(results[0], DebouncedInTransactionError)
    assert outbox_ids(on_database) == []


def test_after_in_a_transaction_waits_for_jobs_of_the_same_transaction(
    engines: Engines, on_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`after=` with `connection=`: an upstream id may be a job of the same transaction (in the
    outbox, not yet sent) or one dispatched before; an unknown one is refused and nothing of
    that job is written; the dependent job waits and gets the upstream's result."""
    import tests.children_jobs  # noqa: F401 (children.report)
    from jobyard.dispatcher import UnknownUpstreamError

    monkeypatch.setenv(
        "JOBYARD_JOB_MODULES", "tests.jobs,tests.conformance_jobs,tests.children_jobs"
    )
    engines.start_worker()
    gate, reports = tmp_path / "gate", tmp_path / "reports"
    gate.mkdir(), reports.mkdir()
    earlier = dispatch_job("system.echo", {"n": 1})
    with get_engine().begin() as connection:
        upstream = dispatch_job("children.gated", {"marker_dir": str(gate)}, connection=connection)
        report = dispatch_job(
            "children.report", {"marker_dir": str(reports)}, connection=connection,
            after=[upstream.job_id, earlier.job_id],
        )  # fmt: skip
        with pytest.raises(UnknownUpstreamError):
            dispatch_job("children.report", {"marker_dir": str(reports)},
                         connection=connection, after=["no-such-job"])  # fmt: skip
        batch = dispatch_many([DispatchRequest("system.echo", {"n": 2}, after=["nope"])],
                              connection=connection)  # fmt: skip
        assert isinstance(batch[0], UnknownUpstreamError)
    assert sorted(outbox_ids(on_database)) in ([], sorted([upstream.job_id, report.job_id]))
    wait_for(lambda: get_job(report.job_id).display_state == "waiting for 2 jobs", timeout=60)
    assert not (reports / "report").exists()
    (gate / "go").touch()
    status = engines.wait(report.job_id, timeout=90)
    assert status.state == "succeeded", status
    assert status.result == {upstream.job_id: True, earlier.job_id: {"n": 1}}
    assert (reports / "report").read_text().count("ran") == 1

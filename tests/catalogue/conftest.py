"""Job-catalogue test fixtures: real databases, migrated by `jobyard.job_engine.db.migrate`.

* `pg_url` — a fresh PostgreSQL database `jobyard_test_<random>` in the local cluster (the
  `test` database is only used to create and drop it), migrated to head; dropped at the end.
* `sqlite_url` — a fresh SQLite file, migrated to head.
* `pg_database` / `sqlite_database` — per test: every table emptied and `DATABASE_URL` pointing
  at that database, so jobs run through `run_inline` use it. `database` is parametrized over both.
* `child_dispatches` — a real dispatcher hook installed with `children.install_dispatcher` that
  records each child job and returns its handle.

Set `JOBYARD_TEST_PG_ADMIN_URL` to use another PostgreSQL cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from jobyard.job_engine import children, env
from jobyard.job_engine.db import dispose_engines, get_engine
from jobyard.job_engine.db.migrate import upgrade
from tests.support import create_pg_database, drop_pg_database, migrated_pg_database


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with migrated_pg_database() as url:
        yield url


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty, unmigrated PostgreSQL database for this test only."""
    url = create_pg_database("jobyard_test_fresh")
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path: Path = tmp_path_factory.mktemp("sqlite") / "jobyard.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    yield url
    dispose_engines(url)


def empty_tables(url: str) -> None:
    """Delete every row of every table except Alembic's (works for tables added later too)."""
    engine = get_engine(url)
    tables = [t for t in inspect(engine).get_table_names() if t != "alembic_version"]
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            if tables:
                quoted = ", ".join(f'"{t}"' for t in tables)
                connection.execute(text(f"TRUNCATE {quoted} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                connection.execute(text(f'DELETE FROM "{table}"'))


@pytest.fixture(autouse=True)
def _catalogue_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's own settings out of the tests."""
    for name in (env.TEMP_DIR, env.REPORT_RECIPIENTS):
        monkeypatch.delenv(name, raising=False)
    # The peers (webhook receiver, Gemini stand-in) listen on loopback, which webhooks may only
    # reach when allow-listed.
    monkeypatch.setenv(env.WEBHOOK_ALLOW, "127.0.0.1")


@pytest.fixture
def pg_database(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    empty_tables(pg_url)
    monkeypatch.setenv(env.DATABASE_URL, pg_url)
    return pg_url


@pytest.fixture
def sqlite_database(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    empty_tables(sqlite_url)
    monkeypatch.setenv(env.DATABASE_URL, sqlite_url)
    return sqlite_url


@pytest.fixture(params=["pg", "sqlite"], ids=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest) -> str:
    """The URL of an emptied, migrated database (both backends); `DATABASE_URL` points at it."""
    return request.getfixturevalue(f"{request.param}_database")


class ChildRecorder:
    """A dispatcher hook: records (name, payload, job_id) and returns a handle, once per job id
    (like the real dispatcher, a known job id is not started twice)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.started: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, payload: Any, job_id: str) -> dict[str, Any]:
        self.calls.append({"name": name, "payload": payload, "job_id": job_id})
        self.started.setdefault(job_id, {"name": name, "payload": payload})
        return {"job_id": job_id, "engine": "recorded"}


@pytest.fixture
def child_dispatches() -> Iterator[ChildRecorder]:
    recorder = ChildRecorder()
    children.install_dispatcher(recorder)
    try:
        yield recorder
    finally:
        children.install_dispatcher(None)

"""API test fixtures: the real app served by uvicorn on a free port, a PostgreSQL job log.

* `job_log_db` — a fresh PostgreSQL database for the session, migrated to head; per test its
  tables are emptied and `DATABASE_URL` points at it (set before any worker starts, so the
  workers write the same job log the API reads).
* `api` — the app from `jobyard.api.create_app()` on a real uvicorn server in a thread of the
  test process, with the test's environment; `api.client` is an httpx client bound to it that
  sends an API token (`api_token`), `api.anonymous` one that sends none.
* `api_token` — `JOBYARD_API_TOKEN` set to a fresh random value (the API is closed without one).
* `admin_token` — `JOBYARD_ADMIN_TOKEN` set to a fresh random value.
* `on_engine(engines, monkeypatch, engine)` — make the API dispatch to that engine: start its
  worker and set `USE_DRAMATIQ` (the API reads it per dispatch).

Set `JOBYARD_TEST_PG_ADMIN_URL` to use another PostgreSQL cluster.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import inspect, text
from sqlalchemy.exc import OperationalError

from jobyard.api import create_app
from jobyard.job_engine import env
from jobyard.job_engine.db import get_engine
from tests.engines import Engines
from tests.support import free_port

JOB_MODULES = "tests.jobs,tests.api.jobs_api"


@pytest.fixture
def job_log_db(job_log_db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    engine = get_engine(job_log_db_url)
    tables = [t for t in inspect(engine).get_table_names() if t != "alembic_version"]
    quoted = ", ".join(f'"{t}"' for t in tables)
    for attempt in range(5):
        try:
            with engine.begin() as connection:
                connection.execute(text(f"TRUNCATE {quoted} RESTART IDENTITY CASCADE"))
            break
        except OperationalError as exc:
            # The module's shared workers (shared_api) keep writing the job log, their shipper's
            # lease at least: PostgreSQL may pick this TRUNCATE as a deadlock's victim.
            if "deadlock" not in str(exc) or attempt == 4:
                raise
    monkeypatch.setenv(env.DATABASE_URL, job_log_db_url)
    return job_log_db_url


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> str:
    token = secrets.token_urlsafe(24)
    monkeypatch.setenv(env.ADMIN_TOKEN, token)
    return token


@pytest.fixture
def api_token(monkeypatch: pytest.MonkeyPatch) -> str:
    token = secrets.token_urlsafe(24)
    monkeypatch.setenv(env.API_TOKEN, token)
    return token


class ApiServer:
    """uvicorn serving the app in a daemon thread; stops when the test ends."""

    def __init__(self, token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="api-server", daemon=True)
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, timeout=30, headers=auth)
        self.anonymous = httpx.Client(base_url=self.url, timeout=30)

    def start(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the API server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.client.close()
        self.anonymous.close()
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def admin(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(
        self,
        job_id: str,
        until: Callable[[dict[str, Any]], bool],
        timeout: float = 60,
        engines: Engines | None = None,
    ) -> dict[str, Any]:
        """Poll GET /jobs/{id} until `until(detail)`; fails with the last answer (and the
        workers' logs) on timeout."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            response = self.client.get(f"/jobs/{job_id}")
            last = response.json() if response.status_code == 200 else response.text
            if response.status_code == 200 and until(last):
                return last
            time.sleep(0.1)
        logs = engines.logs() if engines is not None else ""
        raise AssertionError(f"job {job_id}: condition not met in {timeout}s; last: {last}\n{logs}")


@pytest.fixture
def api_job_modules(monkeypatch: pytest.MonkeyPatch, jobyard_env: dict[str, str]) -> None:
    """Load the API test jobs in this process and in every worker started after this."""
    monkeypatch.setenv(env.JOB_MODULES, JOB_MODULES)


@pytest.fixture
def api(
    jobyard_env: dict[str, str], api_job_modules: None, job_log_db: str, api_token: str
) -> Iterator[ApiServer]:
    server = ApiServer(api_token).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_settings(job_log_db_url: str) -> dict[str, str]:
    """The API tests' shared workers load their jobs and write the PostgreSQL job log."""
    return {env.JOB_MODULES: JOB_MODULES, env.DATABASE_URL: job_log_db_url}


@pytest.fixture
def shared_api(shared_engines: Engines, job_log_db: str, api_token: str) -> Iterator[ApiServer]:
    """`api` on the module's shared Redis and workers (tests/conftest.py shared_engines): for
    tests that look at their own jobs only; one that lists or counts every job, queue or worker
    takes `api` and `engines`."""
    server = ApiServer(api_token).start()
    yield server
    server.stop()


def on_engine(engines: Engines, monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """Route the API's dispatches to `engine`, with a worker of that engine running."""
    if engine == "dramatiq":
        monkeypatch.setenv(env.USE_DRAMATIQ, "true")
        if engines.worker is None:
            engines.start_worker()
    else:
        monkeypatch.setenv(env.USE_DRAMATIQ, "false")
        if engines.temporal_worker is None:
            engines.start_temporal_worker()

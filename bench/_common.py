"""Shared set-up for benchmarks: private services and percentile helpers."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import Proc, RedisServer, TemporalDevServer, free_port, wait_for  # noqa: E402

__all__ = [
    "ROOT",
    "Proc",
    "RedisServer",
    "TemporalDevServer",
    "free_port",
    "pct",
    "set_env",
    "wait_for",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summary_us(values: list[float]) -> str:
    return (
        f"p50 {pct(values, 50) * 1e6:8.1f} us   p99 {pct(values, 99) * 1e6:8.1f} us   "
        f"mean {statistics.fmean(values) * 1e6:8.1f} us"
    )


def set_env(**values: str) -> None:
    os.environ.update(values)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    from jobyard.dispatcher import reset_dispatcher
    from jobyard.job_engine.db.joblog import reset_writer
    from jobyard.queue.client import reset_clients

    reset_dispatcher()
    reset_clients()
    reset_writer()  # reads JOBYARD_JOB_LOG again


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, migrated PostgreSQL database for the job log (SQLite if PostgreSQL is absent)."""
    import uuid

    import sqlalchemy as sa

    from jobyard.job_engine.db import dispose_engines
    from jobyard.job_engine.db.migrate import upgrade

    admin_url = os.environ.get(
        "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    name = f"jobyard_bench_{uuid.uuid4().hex[:8]}"
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # no PostgreSQL here: an SQLite file still measures the write path
        print(f"(PostgreSQL unavailable: {exc.__class__.__name__}; the job log uses SQLite)")
        directory = tempfile.mkdtemp(prefix="jobyard-bench-")
        url = f"sqlite:///{directory}/jobyard.db"
        upgrade(url)
        yield url
        return
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        from jobyard.job_engine.db.joblog import reset_writer

        reset_writer()  # flush what is buffered before the database goes
        dispose_engines(url)
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

"""The database layer: SQLAlchemy 2 over psycopg 3 (PostgreSQL) or SQLite (the embedded default).

    from jobyard.job_engine.db import session_scope
    from jobyard.job_engine.db.models import Token

    with session_scope() as session:          # commits on success, rolls back on error
        session.add(Token(user_id="42", token="...", expires_at=...))

`DATABASE_URL` selects the database. Unset, jobyard uses an SQLite file `.jobyard/jobyard.db` under
the current directory. `postgres://` and `postgresql://` URLs are normalised to the psycopg 3
driver (`postgresql+psycopg://`). Create the schema with `jobyard.job_engine.db.migrate.upgrade()`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from jobyard.job_engine import env

DEFAULT_SQLITE_DIR = ".jobyard"
DEFAULT_SQLITE_FILE = "jobyard.db"

_PG_PREFIXES = ("postgres://", "postgresql://")

# Deterministic constraint names, so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every jobyard table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, stored in UTC on every backend and always read back aware.

    PostgreSQL keeps `timestamptz`; SQLite has no time zones, so values are stored as naive UTC
    (which keeps string comparison in SQL correct) and tagged UTC again when read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}: {value!r}")
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; use an aware one (UTC)")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSON everywhere; JSONB on PostgreSQL (indexable, compact). None is SQL NULL, not JSON null.
JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def normalize_url(url: str) -> str:
    """`postgres://` and `postgresql://` -> `postgresql+psycopg://`; other URLs unchanged."""
    url = url.strip()
    if not url:
        raise ValueError(f"{env.DATABASE_URL} is empty")
    for prefix in _PG_PREFIXES:
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def default_sqlite_url(base: Path | None = None) -> str:
    """`sqlite:///<cwd>/.jobyard/jobyard.db`, creating the directory if needed."""
    directory = (base or Path.cwd()) / DEFAULT_SQLITE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(directory / DEFAULT_SQLITE_FILE).resolve()}"


def database_url() -> str:
    """The configured database URL (env `DATABASE_URL`), or the embedded SQLite file."""
    raw = env.get(env.DATABASE_URL)
    if raw is None or not raw.strip():
        return default_sqlite_url()
    return normalize_url(raw)


_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}
_lock = threading.Lock()


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _create(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _key(url: str | None) -> str:
    return normalize_url(url) if url is not None else database_url()


def get_engine(url: str | None = None) -> Engine:
    """The engine for `url` (default: `database_url()`), created once per URL and process."""
    key = _key(url)
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _engines[key] = _create(key)
    return engine


def _sessionmaker(url: str | None) -> sessionmaker[Session]:
    key = _key(url)
    factory = _sessionmakers.get(key)
    if factory is None:
        engine = get_engine(key)
        with _lock:
            factory = _sessionmakers.setdefault(
                key, sessionmaker(bind=engine, expire_on_commit=False)
            )
    return factory


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session in one transaction: committed when the block succeeds, rolled back on error."""
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines(url: str | None = None) -> None:
    """Close pooled connections (of one URL, or all): before dropping a database, after fork."""
    with _lock:
        keys = [normalize_url(url)] if url is not None else list(_engines)
        for key in keys:
            _sessionmakers.pop(key, None)
            engine = _engines.pop(key, None)
            if engine is not None:
                engine.dispose()


__all__ = [
    "Base",
    "JSONType",
    "UTCDateTime",
    "database_url",
    "dispose_engines",
    "get_engine",
    "normalize_url",
    "session_scope",
    "utcnow",
]

"""Alembic environment for jobyard.

Used through `jobyard.job_engine.db.migrate`, which passes an open connection in
`config.attributes["connection"]` (or at least the URL in `config.attributes["url"]`).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from jobyard.job_engine.db import Base, get_engine
from jobyard.job_engine.db import models as _models  # noqa: F401  (registers the tables)

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER TABLE on SQLite
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.attributes.get("url") or config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    with get_engine(url).begin() as connection:
        _run(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

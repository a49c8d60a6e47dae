"""Run jobyard's Alembic migrations from code; no alembic.ini needed.

    from jobyard.job_engine.db.migrate import upgrade
    upgrade()                      # DATABASE_URL, or the embedded SQLite file
    upgrade("postgresql://...")    # a given database

The scripts live in `migrations/` inside this package (shipped in the wheel). New revisions go in
`migrations/versions/`, each naming its parent in `down_revision`; the first is `0001_initial`.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from jobyard.job_engine.db import database_url, get_engine, normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for `url` built in code (script_location = the package's migrations)."""
    resolved = normalize_url(url) if url is not None else database_url()
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    # configparser treats % as interpolation; the URL is also handed over unescaped below.
    config.set_main_option("sqlalchemy.url", resolved.replace("%", "%%"))
    config.attributes["url"] = resolved
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at `url` (default: `database_url()`) up to `revision`."""
    config = alembic_config(url)
    with get_engine(config.attributes["url"]).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Migrate the database at `url` down to `revision` (default: drop everything)."""
    config = alembic_config(url)
    with get_engine(config.attributes["url"]).begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def current_revision(url: str | None = None) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    config = alembic_config(url)
    with get_engine(config.attributes["url"]).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision shipped in this package."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()

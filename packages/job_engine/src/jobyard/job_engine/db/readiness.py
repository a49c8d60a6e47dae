"""Is this process set up to dispatch? One line that says what is missing or unmigrated.

A web process that only dispatches needs three settings: REDIS_URL, TEMPORAL_ADDRESS and
DATABASE_URL (the job log; not needed with JOBYARD_JOB_LOG=false). Their defaults suit one
machine (`jobyard dev`), so an unset one is worth one warning at start-up, not an error; and a
database without jobyard's tables would otherwise surface as a flush error every half second.

    from jobyard.job_engine.db.readiness import check_setup
    check_setup()   # logs one warning line and returns it, or returns None when all is well
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from jobyard.job_engine import env

log = logging.getLogger("jobyard")

#: What a dispatching process reads; the defaults only suit a single machine.
DISPATCH_SETTINGS = (env.REDIS_URL, env.TEMPORAL_ADDRESS, env.DATABASE_URL)


def one_line(exc: BaseException) -> str:
    """An exception as one line: a DBAPI error's own message without SQLAlchemy's SQL and link."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def shown_url(url: str) -> str:
    """The URL with its password hidden, for logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def unset_settings() -> list[str]:
    from jobyard.job_engine.db.joblog import enabled

    needed = [name for name in DISPATCH_SETTINGS if name != env.DATABASE_URL or enabled()]
    return [name for name in needed if not os.environ.get(name, "").strip()]


def database_problem(url: str | None = None) -> str | None:
    """Why the job log database cannot be written (missing, unreachable, not at the newest
    migration), or None. Never creates the embedded SQLite file."""
    if url is None and not os.environ.get(env.DATABASE_URL, "").strip():
        from jobyard.job_engine.db import DEFAULT_SQLITE_DIR, DEFAULT_SQLITE_FILE

        path = Path.cwd() / DEFAULT_SQLITE_DIR / DEFAULT_SQLITE_FILE
        if not path.exists():
            return (
                f"no job log database: {env.DATABASE_URL} is unset and {path} does not exist "
                f"(set {env.DATABASE_URL}, or run `jobyard db upgrade` here)"
            )
    from alembic.runtime.migration import MigrationContext

    from jobyard.job_engine.db import database_url, get_engine, normalize_url
    from jobyard.job_engine.db.migrate import head_revision

    resolved = normalize_url(url) if url is not None else database_url()
    try:
        with get_engine(resolved).connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except Exception as exc:
        return f"the database at {shown_url(resolved)} is unreachable: {one_line(exc)}"
    head = head_revision()
    if current is None:
        return f"the database at {shown_url(resolved)} is not migrated: run `jobyard db upgrade`"
    if current != head:
        return (
            f"the database at {shown_url(resolved)} is at revision {current}, not {head}: "
            "run `jobyard db upgrade`"
        )
    return None


def setup_problems() -> list[str]:
    from jobyard.job_engine.db.joblog import enabled

    problems = []
    if unset := unset_settings():
        problems.append(f"{', '.join(unset)} unset (using the single-machine defaults)")
    if enabled() and (problem := database_problem()):
        problems.append(problem)
    return problems


def check_setup(logger: logging.Logger | None = None) -> str | None:
    """Log what a dispatching process is missing in one warning line, and return it."""
    problems = setup_problems()
    if not problems:
        return None
    line = "jobyard: " + "; ".join(problems)
    (logger or log).warning("%s", line)
    return line

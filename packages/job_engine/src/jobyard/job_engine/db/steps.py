"""Returned steps' results in the SQL database (table `job_steps`), written before the engine
records them in Redis and acknowledges the step.

Redis keeps a job's step results, and that is enough while Redis keeps its data. A Redis that
comes back empty (no persistence, a failover to a replica that missed writes) loses them: the
rescue then dispatches the job again from the job log (jobyard/dispatcher/rescue.py), and
without these rows every step that had returned would run again. Shipping them later, in
batches, is not enough: Redis can die before the batch goes. So each returned step is written
here synchronously, one small INSERT, and only by jobs that use steps.

A database that cannot take the write does not fail the step (its function has returned: failing
now would run it again): the result goes to Redis alone, and the loss is logged once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import Insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from jobyard.job_engine.db import get_engine, session_scope, utcnow
from jobyard.job_engine.db.models import JobStep

log = logging.getLogger("jobyard.steps")
_statements: dict[str, Insert] = {}
_warned = threading.Event()


def _insert(url: str | None) -> tuple[Any, Insert]:
    engine = get_engine(url)
    dialect = engine.dialect.name
    statement = _statements.get(dialect)
    if statement is None:
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        # A step recorded twice (a retried write) keeps its first result: the one acted on.
        statement = _statements[dialect] = insert(JobStep).on_conflict_do_nothing()
    return engine, statement


def save_step(job_id: str, step: str, result_json: str, *, url: str | None = None) -> bool:
    """Keeps a returned step's result; False (logged) when the database cannot take it."""
    try:
        engine, statement = _insert(url)
        with engine.begin() as connection:
            connection.execute(
                statement,
                {"job_id": job_id, "step": step, "result": result_json, "recorded_at": utcnow()},
            )
    except SQLAlchemyError as exc:
        if not _warned.is_set():
            _warned.set()
            log.warning(
                "step results are not kept in the database (%s): a Redis that comes back "
                "empty will run returned steps again (this is logged once)", exc,
            )  # fmt: skip
        return False
    return True


def load_steps(job_ids: list[str], *, url: str | None = None) -> dict[str, dict[str, str]]:
    """job id -> step -> result JSON text, for those of `job_ids` that recorded steps."""
    out: dict[str, dict[str, str]] = {}
    if not job_ids:
        return out
    query = select(JobStep.job_id, JobStep.step, JobStep.result).where(JobStep.job_id.in_(job_ids))
    with session_scope(url) as session:
        for job_id, step, result in session.execute(query):
            out.setdefault(job_id, {})[step] = result
    return out

"""The registry of which engine each caller-chosen job id belongs to (table `job_owners`).

A caller that picks the id may dispatch it again at any time: during an outage, after one, from
another process. Redis alone cannot say whether the id already ran (it may be down, paused or
restarted empty) and Temporal cannot say whether Dramatiq has it, so the first dispatch claims
the id for an engine here, in the SQL database both sides already use, before anything starts;
every later dispatch of the id goes to that engine and nowhere else. A move (Redis failed, no
live workers, the rescue) is a compare-and-set. Ids the dispatcher generates itself cannot be
dispatched again before the caller learns them, so they skip the registry; if one is, the job
log's row for it answers instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from jobyard.dispatcher.errors import EngineUnavailable
from jobyard.dispatcher.models import EngineName
from jobyard.job_engine.db import get_engine, session_scope, utcnow
from jobyard.job_engine.db.models import FINAL_JOB_STATES, JobLog, JobOwner


@dataclass(frozen=True)
class Owner:
    engine: EngineName
    name: str
    payload_digest: str | None  # None when only the job log knew the id
    finished: bool = False  # the job log has it in a final state


def payload_digest(payload: Any) -> str:
    """SHA-256 of the payload's canonical JSON: tells a retry from a different job."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@contextlib.contextmanager
def _map_database_errors() -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise EngineUnavailable(
            "registry", f"job id registry unavailable ({type(exc).__name__}: {exc})"
        ) from exc


class OwnerRegistry:
    def owner(self, job_id: str) -> Owner | None:
        with _map_database_errors(), session_scope() as session:
            row = session.get(JobOwner, job_id)
            logged = session.execute(
                select(JobLog.engine, JobLog.name, JobLog.state).where(JobLog.job_id == job_id)
            ).first()
        finished = logged is not None and logged.state in FINAL_JOB_STATES
        if row is not None:
            return Owner(row.engine, row.name, row.payload_digest, finished)  # type: ignore[arg-type]
        if logged is not None and logged.engine in ("dramatiq", "temporal"):
            return Owner(logged.engine, logged.name, None, finished)
        return None

    def claim(self, job_id: str, engine: EngineName, name: str, digest: str) -> Owner:
        """Claims the id for `engine` unless someone has it; returns whoever has it now."""
        values = {
            "job_id": job_id,
            "engine": engine,
            "name": name,
            "payload_digest": digest,
            "claimed_at": utcnow(),
        }
        with _map_database_errors():
            dialect = get_engine().dialect.name
            insert = pg_insert if dialect == "postgresql" else sqlite_insert
            statement = insert(JobOwner).values(**values).on_conflict_do_nothing()
            with session_scope() as session:
                session.execute(statement)
                row = session.get(JobOwner, job_id)
                assert row is not None
                return Owner(row.engine, row.name, row.payload_digest)  # type: ignore[arg-type]

    def move(self, job_id: str, source: EngineName, target: EngineName) -> None:
        """Hands the id from `source` to `target`; no-op for ids with no row."""
        with _map_database_errors(), session_scope() as session:
            session.execute(
                update(JobOwner)
                .where(JobOwner.job_id == job_id, JobOwner.engine == source)
                .values(engine=target)
            )

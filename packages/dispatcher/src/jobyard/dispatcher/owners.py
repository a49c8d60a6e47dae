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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select, text, update
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

    def owners(self, job_ids: Sequence[str]) -> dict[str, Owner]:
        """`owner` of many ids in two queries: the ids someone has, and who."""
        found: dict[str, Owner] = {}
        with _map_database_errors(), session_scope() as session:
            for chunk in _chunks(list(dict.fromkeys(job_ids))):
                rows = session.scalars(select(JobOwner).where(JobOwner.job_id.in_(chunk))).all()
                logged = {
                    row.job_id: row
                    for row in session.execute(
                        select(JobLog.job_id, JobLog.engine, JobLog.name, JobLog.state).where(
                            JobLog.job_id.in_(chunk)
                        )
                    )
                }
                for row in rows:
                    log_row = logged.get(row.job_id)
                    finished = log_row is not None and log_row.state in FINAL_JOB_STATES
                    found[row.job_id] = Owner(row.engine, row.name, row.payload_digest, finished)  # type: ignore[arg-type]
                for job_id, log_row in logged.items():
                    if job_id not in found and log_row.engine in ("dramatiq", "temporal"):
                        finished = log_row.state in FINAL_JOB_STATES
                        found[job_id] = Owner(log_row.engine, log_row.name, None, finished)
        return found

    def claim_many(
        self, claims: Sequence[tuple[str, str, str]], engine: EngineName
    ) -> dict[str, Owner]:
        """`claim` of many (job id, name, payload digest) for `engine` in one statement per
        chunk; returns whoever has each id now."""
        now = utcnow()
        found: dict[str, Owner] = {}
        with _map_database_errors():
            dialect = get_engine().dialect.name
            insert = pg_insert if dialect == "postgresql" else sqlite_insert
            with session_scope() as session:
                for chunk in _chunks(list(claims)):
                    values = [
                        {"job_id": job_id, "engine": engine, "name": name,
                         "payload_digest": digest, "claimed_at": now}
                        for job_id, name, digest in chunk
                    ]  # fmt: skip
                    session.execute(insert(JobOwner).values(values).on_conflict_do_nothing())
                    ids = [job_id for job_id, _, _ in chunk]
                    for row in session.scalars(select(JobOwner).where(JobOwner.job_id.in_(ids))):
                        found[row.job_id] = Owner(row.engine, row.name, row.payload_digest)  # type: ignore[arg-type]
        return found

    def claim_batch(
        self, claims: Sequence[tuple[str, str, str]], engine: EngineName
    ) -> dict[str, Owner]:
        """`claim_many` in one statement on PostgreSQL (the rows travel as one JSON array):
        what the dispatch outbox's relay claims each pass, a batch of up to a thousand ids.
        Whoever has each id now; `finished` is not read (the engines dedupe a finished id)."""
        if not claims:
            return {}
        if get_engine().dialect.name != "postgresql":
            return self.claim_many(claims, engine)
        rows = json.dumps([{"job_id": j, "name": n, "payload_digest": d} for j, n, d in claims])
        with _map_database_errors(), get_engine().begin() as connection:
            found = connection.execute(_CLAIM_BATCH, {"rows": rows, "engine": engine}).all()
        return {job_id: Owner(owner, name, digest) for job_id, owner, name, digest in found}

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
        self.move_many([job_id], source, target)

    def move_many(self, job_ids: list[str], source: EngineName, target: EngineName) -> None:
        """`move` for many ids in one statement (the rescue moves hundreds at once)."""
        if not job_ids:
            return
        with _map_database_errors(), session_scope() as session:
            session.execute(
                update(JobOwner)
                .where(JobOwner.job_id.in_(job_ids), JobOwner.engine == source)
                .values(engine=target)
            )


#: PostgreSQL: claims the ids no one has for :engine and returns every id's owner: the rows it
#: inserted, and (the statement's snapshot predates its insert) the ones that were there.
_CLAIM_BATCH = text(
    "WITH given AS (SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb))"
    " AS g(job_id text, name text, payload_digest text)),"
    " inserted AS (INSERT INTO job_owners (job_id, engine, name, payload_digest, claimed_at)"
    " SELECT job_id, :engine, name, payload_digest, now() FROM given ORDER BY job_id"
    " ON CONFLICT (job_id) DO NOTHING RETURNING job_id, engine, name, payload_digest)"
    " SELECT job_id, engine, name, payload_digest FROM inserted"
    " UNION ALL SELECT o.job_id, o.engine, o.name, o.payload_digest FROM job_owners o"
    " JOIN given g ON g.job_id = o.job_id"
)

T = TypeVar("T")


def _chunks(items: list[T], size: int = 500) -> Iterator[list[T]]:
    """Slices small enough for one statement's parameters on every database (SQLite's limit is
    32766 since 3.32; five columns of 500 rows stay far below it)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]

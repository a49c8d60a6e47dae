"""Returned steps' results in the SQL database (table `job_steps`), written before the engine
records them in Redis and acknowledges the step.

Redis keeps a job's step results, and that is enough while Redis keeps its data. A Redis that
comes back empty (no persistence, a failover to a replica that missed writes) loses them: the
rescue then dispatches the job again from the job log (jobyard/dispatcher/rescue.py), and
without these rows every step that had returned would run again. Shipping them later, in
batches, is not enough: Redis can die before the batch goes. So each returned step is written
here synchronously (the step waits for the commit), and only by jobs that use steps; concurrent
steps of a process share one transaction (group commit, see StepJournal).

A database that cannot take the write does not fail the step (its function has returned: failing
now would run it again): the result goes to Redis alone, and the loss is logged once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from jobyard.job_engine import crypto
from jobyard.job_engine.db import get_engine, session_scope, utcnow
from jobyard.job_engine.db.models import JobStep

log = logging.getLogger("jobyard.steps")
#: Seconds a step waits for its row to be committed before going on without it (logged).
COMMIT_PATIENCE = 10.0
_WAIT_SLICE = 0.1
# A step recorded twice (a retried write) keeps its first result: the one acted on.
_COLUMNS = "job_steps (job_id, step, result, recorded_at)"
_PG_ROW, _SQLITE_ROW = "(%s, %s, %s, %s)", "(?, ?, ?, ?)"
#: Rows per INSERT statement (4 parameters each; SQLite allows 32,766 in all, PostgreSQL 65,535).
_ROWS_PER_STATEMENT = 250


def _insert(row: str, count: int) -> str:
    """One INSERT of `count` rows; DO NOTHING keeps the first of a step's rows, even within it."""
    return f"INSERT INTO {_COLUMNS} VALUES {', '.join([row] * count)} ON CONFLICT DO NOTHING"


class _Pending:
    """A row handed to the writer, and the signal of its commit: a bare lock, released once
    (an Event's Condition costs each step more than the rest of its hand-off)."""

    __slots__ = ("_done", "ok", "row")

    def __init__(self, row: tuple[Any, ...]) -> None:
        self.row = row
        self.ok = False
        self._done = threading.Lock()
        self._done.acquire()

    def set(self) -> None:
        """Once, by the writer."""
        self._done.release()

    def wait(self, timeout: float) -> bool:
        """Whether the write ended within `timeout`. In slices: an exception raised in the
        waiting thread from another (Dramatiq's TimeLimit) lands between two."""
        deadline = time.monotonic() + timeout
        while not self._done.acquire(True, min(_WAIT_SLICE, max(deadline - time.monotonic(), 0))):
            if time.monotonic() >= deadline:
                return False
        self._done.release()  # for any later wait, as an Event would
        return True


class StepJournal:
    """Group commit: a writer thread inserts every row handed to it since its last commit in
    one transaction, while each caller waits for the commit of the batch holding its row. A
    step is still durable before it is acknowledged; what it no longer pays alone is the
    transaction (a commit, an fsync), which concurrent steps of the process share. A lone step's
    batch is itself, written at once.

    The writing is not done by one of the waiting steps (a leader): a worker thread can be hit
    by Dramatiq's TimeLimit exception anywhere, and a leader hit mid-write would leave every
    later step waiting. A caller only ever waits on its own event."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url
        self._pending: list[_Pending] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._warned = False

    def save(self, job_id: str, step: str, result_json: str) -> bool:
        """Keeps a returned step's result; False (logged) when the database cannot take it."""
        return self.begin(job_id, step, result_json)()

    def begin(self, job_id: str, step: str, result_json: str) -> Callable[[], bool]:
        """Starts keeping a step's result and returns at once; call what it returns to wait
        for the commit (True) or its failure (False, logged). The caller does its other
        bookkeeping (Redis) meanwhile."""
        entry = _Pending((job_id, step, crypto.seal_json(job_id, result_json), utcnow()))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._write_forever, name="jobyard-step-journal", daemon=True
                )
                self._thread.start()
            self._pending.append(entry)
            self._lock.notify()

        def committed() -> bool:
            if not entry.wait(COMMIT_PATIENCE):
                self._warn(f"no commit in {COMMIT_PATIENCE:g} s")
            return entry.ok

        return committed

    def _write_forever(self) -> None:
        writer: _Writer | None = None
        while True:
            with self._lock:
                while not self._pending:
                    self._lock.wait()
                batch, self._pending = self._pending, []
            ok = False
            try:
                if writer is None:
                    writer = _Writer(self.url)
                writer.write(batch)
                ok = True
            except Exception as exc:  # the driver's own errors: the connection is suspect
                self._warn(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.invalidate()
                    writer = None
            for entry in batch:
                entry.ok = ok
                entry.set()

    def _warn(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "step results are not kept in the database (%s): a Redis that comes back "
                "empty will run returned steps again (this is logged once)", reason,
            )  # fmt: skip


class _Writer:
    """The journal thread's own connection and cursor. On PostgreSQL it autocommits: a batch is
    then one round trip, its INSERT, where a transaction costs three (BEGIN, INSERT, COMMIT),
    and a statement is as durable as a transaction of it. The cursor is kept: psycopg keeps the
    dumpers it found for the parameters' types per cursor, and looks each up again in a new
    one."""

    def __init__(self, url: str | None) -> None:
        engine = get_engine(url)
        self.connection: Any = engine.raw_connection()
        self.sqlite = engine.dialect.name == "sqlite"
        if not self.sqlite:
            driver: Any = self.connection.driver_connection  # psycopg's own connection
            driver.autocommit = True
        self.cursor = self.connection.cursor()

    def write(self, batch: list[_Pending]) -> None:
        """One multi-row INSERT (per 250 rows) on the driver's own connection: the
        per-statement work of SQLAlchemy's execution layer, and of psycopg's executemany (its
        pipeline mode), costs more than the insert of a batch of a few rows."""
        rows = [e.row for e in batch]
        if self.sqlite:  # as UTCDateTime stores it: naive UTC text (timestamptz on PostgreSQL)
            rows = [(*r[:3], r[3].replace(tzinfo=None).isoformat(" ")) for r in rows]
        row = _SQLITE_ROW if self.sqlite else _PG_ROW
        for first in range(0, len(rows), _ROWS_PER_STATEMENT):
            chunk = rows[first : first + _ROWS_PER_STATEMENT]
            self.cursor.execute(_insert(row, len(chunk)), [v for r in chunk for v in r])
        self.connection.commit()  # SQLite's; nothing to do when autocommitting

    def invalidate(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.invalidate()


_journal: StepJournal | None = None
_journal_lock = threading.Lock()


def begin_step(job_id: str, step: str, result_json: str) -> Callable[[], bool]:
    """StepJournal.begin on the process's journal (DATABASE_URL)."""
    global _journal
    if _journal is None:
        with _journal_lock:
            if _journal is None:
                _journal = StepJournal()
    return _journal.begin(job_id, step, result_json)


def reset_journal() -> None:
    """Forget the process's journal: the next step opens one on DATABASE_URL as it is then (a
    process whose settings changed; tests). Steps begun before are still committed."""
    global _journal
    with _journal_lock:
        _journal = None


def load_steps(job_ids: list[str], *, url: str | None = None) -> dict[str, dict[str, str]]:
    """job id -> step -> result JSON text as kept (sealed, with encryption on: see
    `recall_steps`), for those of `job_ids` that recorded steps."""
    out: dict[str, dict[str, str]] = {}
    if not job_ids:
        return out
    query = select(JobStep.job_id, JobStep.step, JobStep.result).where(JobStep.job_id.in_(job_ids))
    with session_scope(url) as session:
        for job_id, step, result in session.execute(query):
            out.setdefault(job_id, {})[step] = result
    return out


def recall_steps(job_id: str) -> dict[str, str]:
    """One job's kept step results (load_steps), for a Dramatiq run whose Redis records may be
    incomplete (see may_have_lost in jobyard.lua), opened. Raises SQLAlchemyError when
    unreadable."""
    kept = load_steps([job_id]).get(job_id, {})
    return {step: crypto.unseal_json(job_id, text) for step, text in kept.items()}

"""The job log's shipper: copies Dramatiq jobs' records from Redis to the database.

A worker's Lua call that changes a job also marks the job in the job log's outbox (a zset
scored by the change time, see jobyard.lua) in the same atomic step. The shipper, a thread in
every `jobyard worker` supervisor, reads the oldest marks, reads those jobs' records, upserts
them into the job log in one statement, then unmarks them unless a worker changed them again
meanwhile. A lease in Redis lets one shipper at a time do this, so replicas do not write the
same rows twice.

Why not write the log from the worker processes: the work per job (building the row, batching
it, turning it into SQL) competes for the GIL with the job threads of a busy worker, and a
worker killed before its next flush lost its buffer. Here a worker does no job log work at all,
and whatever Redis holds reaches the database.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from jobyard.job_engine.db import joblog
from jobyard.job_engine.lifecycle import FINAL_STATES
from jobyard.queue import keys
from jobyard.queue.store import JobStore

log = logging.getLogger("jobyard.shipper")

#: The job record fields (jobyard.lua) a job log row is made from, in HMGET order.
FIELDS = (
    "engine", "name", "queue", "state", "attempts", "enqueued_at", "started_at", "finished_at",
    "result", "error", "error_class", "traceback", "progress", "payload", "run_at",
)  # fmt: skip
#: Jobs read and written per statement.
BATCH = 1000
#: Values a database may refuse (e.g. a NUL character in JSON, for PostgreSQL's JSONB).
JSON_COLUMNS = ("result", "payload", "progress")


def to_row(job_key: bytes, mark: bytes, values: list[bytes | None]) -> dict[str, Any] | None:
    """A job log row (times in unix seconds, as `joblog.upsert` takes them), or None for a job
    whose record expired or that Temporal took over (Temporal's side logs those itself)."""
    (engine, name, queue, state, attempts, enqueued_at, started_at, finished_at, result,
     error, error_class, traceback, progress, payload, run_at) = values  # fmt: skip
    if engine != b"dramatiq" or state is None:
        return None
    row: dict[str, Any] = {
        "job_id": job_key.decode()[len(keys.job_prefix()) :],
        "name": (name or b"unknown").decode(),
        "queue": queue and queue.decode(),
        "engine": "dramatiq",
        "state": state.decode(),
        "attempts": int(attempts or 0),
        "state_at": float(mark) / 1000,
    }
    # A rescheduled job (a durable sleep, a retry, a throttle) waits for this time; once the
    # job changed again after it, it is past.
    if run_at and int(run_at) > int(float(mark)) and row["state"] not in FINAL_STATES:
        row["run_at"] = int(run_at) / 1000
    if enqueued_at:
        row["enqueued_at"] = int(enqueued_at) / 1000
    if started_at:
        row["started_at"] = int(started_at) / 1000
    if finished_at and row["state"] in FINAL_STATES:
        row["finished_at"] = int(finished_at) / 1000
        if started_at:
            row["duration_ms"] = int(finished_at) - int(started_at)
    if result and row["state"] == "succeeded":
        row["result"] = json.loads(result)
    if error:
        row["error_message"] = error.decode()[:2000]
    if error_class:
        row["error_class"] = error_class.decode()
    if traceback:
        row["error_traceback"] = traceback.decode()
    if progress:
        row["progress"] = json.loads(progress)
    if payload:
        row["payload"] = json.loads(payload)
    return row


def _refused(exc: DBAPIError) -> bool:
    """The database refused the statement; not a lost or broken connection."""
    return not (isinstance(exc, OperationalError) or exc.connection_invalidated)


class JobLogShipper:
    def __init__(
        self,
        store: JobStore,
        interval: float,
        *,
        database_url: str | None = None,
        batch: int = BATCH,
    ) -> None:
        self.store = store
        self.interval = interval
        self.database_url = database_url
        self.batch = batch
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Renewed every batch and every interval; a shipper that died hands over after this.
        self.lease_ms = int((4 * interval + 2) * 1000)
        self._failing = False

    def ship_batch(self) -> int:
        """Ship the oldest marked jobs; returns how many marks were read (0: none left)."""
        marks = self.store.changed_jobs(self.batch)
        if not marks:
            return 0
        records = self.store.job_fields([job_key for job_key, _ in marks], FIELDS)
        rows = [
            row
            for (job_key, mark), values in zip(marks, records, strict=True)
            if (row := to_row(job_key, mark, values)) is not None
        ]
        if rows:
            self._write(rows)
        self.store.shipped(marks)
        return len(marks)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """One statement; if the database refuses a row (not a lost connection), the rows go
        one at a time, so one bad value cannot hold back every job behind it."""
        try:
            joblog.upsert(rows, self.database_url)
        except DBAPIError as exc:
            if not _refused(exc):
                raise
            for row in rows:
                self._write_one(row)

    def _write_one(self, row: dict[str, Any]) -> None:
        try:
            joblog.upsert([row], self.database_url)
        except DBAPIError as exc:
            if not _refused(exc):
                raise
            reason = str(exc.orig).splitlines()[0]
            log.warning("job log refused job %s (%s); written without JSON", row["job_id"], reason)
            without_json = {k: v for k, v in row.items() if k not in JSON_COLUMNS}
            joblog.upsert([without_json], self.database_url)

    def ship_all(self) -> None:
        """Ship until the outbox is empty, if this shipper holds (or can take) the lease."""
        while self.store.take_lease(keys.job_log_shipper(), self.holder, self.lease_ms):
            if self.ship_batch() < self.batch:
                return

    def run(self, stopping: threading.Event) -> None:
        """Ship every `interval` seconds until `stopping` is set, then once more."""
        while not stopping.wait(self.interval):
            self._ship_logging_failures()
        self._ship_logging_failures()

    def _ship_logging_failures(self) -> None:
        try:
            self.ship_all()
        except Exception as exc:  # Redis or the database is down: the marks wait in Redis
            if not self._failing:
                log.warning("job log shipping failed (%s); will retry", exc)
            self._failing = True
        else:
            if self._failing:
                log.info("job log shipping resumed")
            self._failing = False

    def start(self, stopping: threading.Event) -> threading.Thread:
        # A daemon: a database hung at shutdown must not keep the supervisor alive past its
        # grace period (an unfinished batch stays marked in Redis).
        thread = threading.Thread(
            target=self.run, args=(stopping,), name="jobyard-shipper", daemon=True
        )
        thread.start()
        return thread

"""The job log's shipper: writes Dramatiq jobs' changes from Redis to the database.

A worker's Lua call that changes a job (a state, a progress report) also appends the change to
the job log's outbox, a Redis stream (see jobyard.lua), in the same atomic step. The shipper, a
thread in every `jobyard worker` supervisor, reads the oldest entries, writes them to the job
log in one transaction (`joblog.ship`: every change one event, in order), then trims them from
the stream. A lease in Redis lets one shipper at a time do this. A shipper that dies between its
commit and its trim leaves entries the next one reads again; the job log skips them (each job's
row keeps the id of the last entry written), so no event is written twice, and none is lost.

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

import pydantic_core
from sqlalchemy.exc import DBAPIError, OperationalError

from jobyard.job_engine.collector import collector_paused
from jobyard.job_engine.db import joblog
from jobyard.job_engine.db.joblog import ANNOUNCED, REPORTED, OutboxEvent
from jobyard.job_engine.lifecycle import FINAL_STATES
from jobyard.job_engine.states import JobState
from jobyard.queue import keys
from jobyard.queue.store import JobStore

log = logging.getLogger("jobyard.shipper")

#: Outbox entries read and written per transaction: a busy worker's interval fits in one. A
#: backlog (the database away, a shipper taking over a dead one's lease) is shipped in batches
#: this size, and the supervisor keeps the memory of its largest batch: Python's allocator
#: keeps the arenas the batch's objects fragmented. Shipping four backlogs of 5,000 entries left
#: a supervisor's RSS 15-20 MB higher (the soak's witness worker stepped +22 MB, issue 29),
#: batches of 1,000 4-5 MB; shipper and PostgreSQL CPU per job the same within noise (41-43 and
#: 30-37 us at load 9; measured before at 2.5 us less PostgreSQL and 1 us less shipper CPU with
#: 5,000).
BATCH = 1000
#: Values a database may refuse (e.g. a NUL character in JSON, for PostgreSQL's JSONB).
JSON_COLUMNS = ("result", "payload", "progress")
#: Outbox fields (jobyard.lua) copied as they are, as text, to the row column (or, for a held
#: job's display_state and waiting_reason, its state event's field) of this name.
TEXT_FIELDS = {b"state": "state", b"name": "name", b"queue": "queue",
               b"error_class": "error_class", b"traceback": "error_traceback",
               b"display_state": "display_state", b"waiting_reason": "waiting_reason"}  # fmt: skip
#: Outbox fields holding a time in ms, to the row column of this name (unix seconds).
MS_FIELDS = {b"enqueued_at": "enqueued_at", b"started_at": "started_at", b"run_at": "run_at"}
#: Outbox fields holding JSON, to the row column of this name (a result: of a succeeded job only).
JSON_FIELDS = {b"progress": "progress", b"payload": "payload", b"result": "result"}


def outbox_id(entry_id: bytes) -> int:
    """A Redis stream id ("<ms>-<seq>") as one growing number: ms * 1_000_000 + seq."""
    milliseconds, sequence = entry_id.split(b"-")
    return int(milliseconds) * 1_000_000 + int(sequence)


def _json_value(text: bytes) -> Any:
    """JSON from the outbox, parsed by pydantic-core (a dependency already): a tenth of
    json.loads's time for a job's small result. What it refuses and json.loads takes (an
    escaped lone surrogate) goes through json.loads, as before."""
    try:
        return pydantic_core.from_json(text)
    except ValueError:
        return json.loads(text)


def to_event(entry_id: bytes, entry: dict[bytes, bytes]) -> OutboxEvent:
    """An outbox entry as `joblog.ship` takes it: the fields a job log row takes from it, times
    in unix seconds."""
    fields: dict[str, Any] = {"engine": "dramatiq"}
    for field, value in entry.items():
        if (column := TEXT_FIELDS.get(field)) is not None:
            fields[column] = value.decode()
        elif (column := MS_FIELDS.get(field)) is not None:
            fields[column] = int(value) / 1000
        elif (column := JSON_FIELDS.get(field)) is not None:
            fields[column] = _json_value(value)
        elif field == b"attempts":
            fields["attempts"] = int(value)
        elif field == b"error":
            fields["error_message"] = value.decode()[:2000]
    if "progress" in fields:
        fields[REPORTED] = True
    if b"announced" in entry:  # a wait's first look: an event of the job's history
        fields[ANNOUNCED] = True
    at = float(entry[b"at"])
    state = fields.get("state")
    if state in FINAL_STATES:
        fields["finished_at"] = at
        if (started := entry.get(b"started_at")) is not None:
            fields["duration_ms"] = max(0, int(at * 1000) - int(started))
        if state != JobState.SUCCEEDED:
            fields.pop("result", None)
    else:
        fields.pop("result", None)
    job_id = entry[b"job"].decode()[len(keys.job_prefix()) :]
    return outbox_id(entry_id), at, job_id, fields


def _converted(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[OutboxEvent]:
    """The entries as events, in order, emptying `entries` as it goes: the batch is held once
    through the database write, not as Redis's reply and as events both."""
    entries.reverse()
    events = []
    while entries:
        entry_id, entry = entries.pop()
        events.append(to_event(entry_id, entry))
    return events


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

    def ship_batch(self, *, trim: bool = True) -> int:
        """Ship the oldest outbox entries; returns how many were read (0: none left).
        `trim=False` leaves them in Redis, as a shipper that died after its commit would."""
        with collector_paused():
            entries = self.store.job_log_entries(self.batch)
            if not entries:
                return 0
            read, last = len(entries), entries[-1][0]
            events = _converted(entries)
            self._write(events)
            # Freed while the collector is paused, the batch's objects are never traversed by
            # it (kept until the return, they were: about 1 us per job).
            del events
        if trim:
            self.store.job_log_shipped(last)
        return read

    def _write(self, events: list[OutboxEvent]) -> None:
        """One transaction; if the database refuses it (not a lost connection), the jobs go one
        at a time, so one bad value cannot hold back every job behind it."""
        try:
            joblog.ship(events, self.database_url)
        except DBAPIError as exc:
            if not _refused(exc):
                raise
            per_job: dict[str, list[OutboxEvent]] = {}
            for event in events:
                per_job.setdefault(event[2], []).append(event)
            for job_events in per_job.values():
                self._write_one(job_events)

    def _write_one(self, events: list[OutboxEvent]) -> None:
        try:
            joblog.ship(events, self.database_url)
        except DBAPIError as exc:
            if not _refused(exc):
                raise
            reason = str(exc.orig).splitlines()[0]
            log.warning("job log refused job %s (%s); written without JSON", events[0][2], reason)
            without_json = [
                (entry_id, at, job_id, {k: v for k, v in fields.items() if k not in JSON_COLUMNS})
                for entry_id, at, job_id, fields in events
            ]
            joblog.ship(without_json, self.database_url)

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
        except Exception as exc:  # Redis or the database is down: the entries wait in Redis
            if not self._failing:
                log.warning("job log shipping failed (%s); will retry", exc)
            self._failing = True
        else:
            if self._failing:
                log.info("job log shipping resumed")
            self._failing = False

    def start(self, stopping: threading.Event) -> threading.Thread:
        # A daemon: a database hung at shutdown must not keep the supervisor alive past its
        # grace period (an unfinished batch stays in Redis).
        thread = threading.Thread(
            target=self.run, args=(stopping,), name="jobyard-shipper", daemon=True
        )
        thread.start()
        return thread

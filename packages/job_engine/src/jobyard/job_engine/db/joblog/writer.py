"""The job log's writer: a process's buffer of events and the thread that writes it.

`record` appends an event to an in-process buffer (a deque append: no I/O on the dispatch path
or in the worker loop; times stay unix seconds until the flush turns them into datetimes); a
background thread writes the buffer every `JOBYARD_JOB_LOG_INTERVAL` seconds, in one
transaction (`joblog.write_queued`, `joblog.upsert_rounds`). While the database is down the
events are kept (up to MAX_BUFFER) and the flush is tried again every interval.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from typing import Any

from jobyard.job_engine import env

# The package, for its entry points (each flush is one of their transactions): imported while
# the package itself imports this module, so its names are read at flush time.
from jobyard.job_engine.db import joblog
from jobyard.job_engine.db.joblog.queued import QueuedBatch
from jobyard.job_engine.db.joblog.sealed import sealed_batches, sealed_events
from jobyard.job_engine.db.readiness import one_line

log = logging.getLogger("jobyard.joblog")

#: Beyond this many unflushed events (a long database outage), the oldest are dropped. A web
#: process never gets there by dispatching: dispatch_job refuses from
#: JOBYARD_JOB_LOG_DISPATCH_LIMIT unwritten events on (jobyard/dispatcher/backlog.py), so a
#: dispatch's "queued" is never what is dropped; engines' own events past it are.
MAX_BUFFER = 200_000

#: A failing flush is retried every interval; the same failure is logged at most this often.
REPEAT_LOG_SECONDS = 60.0


class JobLogWriter:
    def __init__(self, url: str | None = None, interval: float | None = None) -> None:
        self.url = url
        self.interval = env.get_float(env.JOB_LOG_INTERVAL) if interval is None else interval
        self._events: deque[tuple[float, str, dict[str, Any]]] = deque(maxlen=MAX_BUFFER)
        self._batches: deque[QueuedBatch] = deque()
        self._batched_jobs = 0  # jobs in self._batches, bounded by MAX_BUFFER as events are
        self._batches_lock = threading.Lock()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def backlog(self) -> int:
        """Events recorded and not written yet (a dispatch_many batch counts its jobs)."""
        return len(self._events) + self._batched_jobs

    def record(self, job_id: str, **fields: Any) -> None:
        """Queue an event; `state_at` defaults to now. Returns at once."""
        ts = fields.pop("ts", None) or time.time()
        state = fields.get("state")
        if state is not None:
            fields["state"] = str(state)  # a JobState as a plain str: see merge.QUEUED
        self._events.append((ts, job_id, fields))
        if self._thread is None:
            self._start()

    def record_queued(self, batch: QueuedBatch) -> None:
        """Queue the "queued" of every job in `batch`: one buffer entry for them all, which the
        flush inserts in one statement (see `QueuedBatch`). Returns at once."""
        with self._batches_lock:
            self._batches.append(batch)
            self._batched_jobs += len(batch.jobs)
            while self._batched_jobs > MAX_BUFFER and len(self._batches) > 1:
                self._batched_jobs -= len(self._batches.popleft().jobs)  # as the events' maxlen
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="jobyard-joblog", daemon=True
                )
                self._thread.start()
                atexit.register(self._flush_at_exit)

    def _run(self) -> None:
        failing: str | None = None  # the current failure, logged once per REPEAT_LOG_SECONDS
        logged_at = 0.0
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # the database is down: keep the events, try again later
                reason = one_line(exc)
                now = time.monotonic()
                if reason != failing or now - logged_at >= REPEAT_LOG_SECONDS:
                    hint = " (run `jobyard db upgrade`)" if "no such table" in reason else ""
                    log.warning(
                        "job log flush failed: %s%s; %d events kept, retrying every %ss "
                        "(logged again in %.0fs if it persists)",
                        reason, hint, len(self._events), self.interval, REPEAT_LOG_SECONDS,
                    )  # fmt: skip
                    failing, logged_at = reason, now
            else:
                if failing is not None:
                    log.warning("job log flush works again")
                    failing = None

    def _flush_at_exit(self) -> None:
        """The last flush: one line, not a traceback, when the database cannot take it."""
        try:
            self.flush()
        except Exception as exc:
            log.warning(
                "job log: %d events not written at exit: %s", len(self._events), one_line(exc)
            )

    def flush(self) -> int:
        """Write every buffered event now; returns how many rows were upserted."""
        with self._lock:
            events = []
            while self._events:
                events.append(self._events.popleft())
            with self._batches_lock:
                batches = list(self._batches)
                self._batches.clear()
                self._batched_jobs = 0
            if not events and not batches:
                return 0
            events, batches = sealed_events(events), sealed_batches(batches)
            try:
                if batches:
                    return joblog.write_queued(batches, events, self.url)
                rounds = joblog.merge_rounds(events)
                joblog.upsert_rounds(rounds, self.url)
            except Exception:
                self._events.extendleft(reversed(events))
                with self._batches_lock:
                    self._batches.extendleft(reversed(batches))
                    self._batched_jobs += sum(len(batch.jobs) for batch in batches)
                raise
            return sum(len(rows) for rows in rounds)

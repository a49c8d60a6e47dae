"""The dispatch outbox's relay: sends jobs committed in callers' transactions to an engine.

Every `jobyard worker` (its supervisor) and every `jobyard temporal-worker` runs one in a thread
(`JOBYARD_DISPATCH_RELAY=false` turns it off); there is no process of its own to run and no
leader. A pass (`relay_once`), in one transaction of the relay's own:

1. deletes up to JOBYARD_DISPATCH_RELAY_BATCH committed outbox rows and reads them (`FOR UPDATE
   SKIP LOCKED` on PostgreSQL: relays running at once take different rows);
2. sends them as `dispatch_many` would send caller-chosen ids: claimed in the id registry
   (owners.py) for the preferred engine, then Dramatiq in batches, Temporal for what Dramatiq
   cannot take, each under the job id its caller already holds;
3. writes each sent job's "queued" into the job log (with the engine that took it, dated when
   the caller dispatched it), and puts back the rows no engine took, with a backoff;
4. commits.

Killed anywhere before 4 (SIGKILL, the database lost), the transaction rolls back: the rows
are in the outbox again, and the next pass sends them again. That second send starts nothing
new: Redis dedupes a job id it has, Temporal a workflow id, and the registry keeps a job that
went to Temporal from being given to Dramatiq too (or the reverse) when Redis changed its mind
in between. So each committed row runs once, and its job log row exists from the commit that
deleted it: the log is complete by construction.

A relay sleeps until woken: PostgreSQL NOTIFYs it at each commit that inserted outbox rows (a
trigger, migration 0011), with a look every `SAFETY_POLL` seconds should a notification be
missed (its connection lost); SQLite has no notifications, so it looks (a read) every
JOBYARD_DISPATCH_RELAY_POLL seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection
from sqlalchemy.engine import make_url

from jobyard.dispatcher.caller_ids import check_same_job
from jobyard.dispatcher.engines import ClaimMode, Submission
from jobyard.dispatcher.errors import EngineUnavailable
from jobyard.dispatcher.models import (
    FALLBACK_REDIS_UNHEALTHY,
    NO_OPTIONS,
    DispatchOptions,
    JobHandle,
)
from jobyard.dispatcher.owners import Owner, payload_digest
from jobyard.dispatcher.routing import result_of
from jobyard.dispatcher.transactional import OUTBOX_TRACE
from jobyard.dispatcher.upstream import record_upstream
from jobyard.job_engine import crypto, env, metrics
from jobyard.job_engine.collector import collector_paused
from jobyard.job_engine.db import dispatch_outbox as outbox
from jobyard.job_engine.db import get_engine, joblog
from jobyard.job_engine.db.readiness import one_line
from jobyard.job_engine.states import JobState

if TYPE_CHECKING:
    from jobyard.dispatcher.dispatch import Dispatcher

log = logging.getLogger("jobyard.relay")

#: Seconds a PostgreSQL relay waits for a notification before it looks anyway.
SAFETY_POLL = 1.0
#: The longest wait before a row no engine took is tried again, in seconds.
MAX_BACKOFF = 60.0
#: The same failure is logged at most this often, in seconds.
REPEAT_LOG_SECONDS = 60.0


class OutboxRelay:
    def __init__(
        self, dispatcher: Dispatcher, url: str | None = None, batch: int | None = None
    ) -> None:
        self.dispatcher = dispatcher
        self.url = url
        self.batch = batch or env.get_int(env.DISPATCH_RELAY_BATCH)

    def relay_once(self) -> int:
        """One pass: returns how many outbox rows it took (sent, or put back)."""
        engine = get_engine(self.url)
        now = time.time()
        if engine.dialect.name == "sqlite":
            return self._relay_sqlite(now)
        with engine.begin() as connection:
            # This transaction need not wait for its commit to reach the disk: lost in a crash,
            # it only puts the rows back, and their resend is deduped (the registry's claim,
            # which must survive, commits on its own, durably, before anything is sent).
            connection.exec_driver_sql("SET LOCAL synchronous_commit = off")
            entries = outbox.take(connection, self.batch, now)
            if not entries:
                return 0
            results = self.send([submission_of(entry, now) for entry in entries])
            self._settle(connection, entries, results, now)
        return len(entries)

    def _relay_sqlite(self, now: float) -> int:
        """SQLite locks the whole file for a writer, and the send writes the id registry on
        connections of its own: the rows are read, sent, and only then deleted (the ones still
        there: a relay beside this one may have sent them too, which the registry and the
        engines dedupe) with their job log rows, in one short transaction."""
        engine = get_engine(self.url)
        with engine.connect() as connection:
            entries = outbox.peek(connection, self.batch, now)
        if not entries:
            return 0
        results = self.send([submission_of(entry, now) for entry in entries])
        with engine.begin() as connection:
            deleted = outbox.delete(connection, entries)
            kept = [(e, r) for e, r in zip(entries, results, strict=True) if e.id in deleted]
            self._settle(connection, [e for e, _ in kept], [r for _, r in kept], now)
        return len(entries)

    def _settle(
        self,
        connection: Connection,
        entries: list[outbox.Entry],
        results: list[JobHandle | Exception],
        now: float,
    ) -> None:
        """In the transaction that deleted `entries`: the sent jobs' job log rows, and the
        others back in the outbox for a later pass."""
        sent: list[tuple[outbox.Entry, JobHandle]] = []
        failed: list[tuple[outbox.Entry, str, float]] = []
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, JobHandle):
                sent.append((entry, result))
            else:
                failed.append((entry, one_line(result), now + backoff(entry.attempts)))
        record_sent(connection, sent, now)
        waiting = [(e.job_id, after) for e, _ in sent if (after := e.options_dict().get("after"))]
        if waiting:  # as dispatch_job keeps them (upstream.py)
            record_upstream(waiting)
        outbox.put_back(connection, failed)
        _count(sent)
        for entry, why, _ in failed[:3]:
            log.warning("job %s (%s) not sent, tried again later: %s", entry.job_id,
                        entry.name, why)  # fmt: skip

    def send(self, jobs: list[Submission]) -> list[JobHandle | Exception]:
        """The jobs as caller-chosen ids of `dispatch_many`: each id claimed in the registry
        (owners.py) for the engine it goes to, before it goes there. A job id claimed before
        (a pass killed before it committed) goes back to its engine, which dedupes it."""
        results: list[JobHandle | Exception | None] = [None] * len(jobs)
        router = self.dispatcher.router
        # The engine the ids are claimed for is the one they go to: a job claimed for Temporal
        # (Redis unhealthy) that the router, its breaker closed meanwhile, gave to Dramatiq
        # would go to Temporal again on a resend, and run twice.
        preferred = router.preferred_engine()
        digests = [payload_digest(job.payload) for job in jobs]
        with collector_paused():
            try:
                claims = [(job.job_id, job.name, d) for job, d in zip(jobs, digests, strict=True)]
                owners = self.dispatcher.owners.claim_batch(claims, preferred)
            except EngineUnavailable as exc:  # the registry's database: nothing was sent
                return [exc] * len(jobs)
            ready: list[tuple[int, Submission]] = []
            for index, (job, digest) in enumerate(zip(jobs, digests, strict=True)):
                owner = owners.get(job.job_id)
                if owner == Owner(preferred, job.name, digest):  # ours, or a crashed pass's
                    ready.append((index, job))
                elif owner is None:
                    results[index] = RuntimeError(f"job id {job.job_id} was not claimed")
                else:
                    results[index] = result_of(self._redispatch, job, owner, digest)
            if preferred == router.dramatiq.name:
                outcomes = router.route_many([(job, True) for _, job in ready])
            else:
                outcomes = [result_of(self._to_temporal, job) for _, job in ready]
        for (index, _), outcome in zip(ready, outcomes, strict=True):
            results[index] = outcome
        return [
            result if result is not None else RuntimeError("relay left a job without a result")
            for result in results
        ]

    def _redispatch(self, job: Submission, owner: Owner, digest: str) -> JobHandle:
        check_same_job(job, owner, digest)
        return self.dispatcher.caller_ids.redispatch(job, owner)

    def _to_temporal(self, job: Submission) -> JobHandle:
        router = self.dispatcher.router
        if not env.get_bool(env.USE_DRAMATIQ):
            return router.route(job, registered=True)  # releases the id in Redis if it answers
        return router.to_temporal(job, FALLBACK_REDIS_UNHEALTHY, ClaimMode.BEST_EFFORT)

    def run(self, stop: threading.Event) -> None:
        """Passes until `stop`: at once while rows keep coming, else when woken."""
        waker = _Waker(self.url)
        waker.prepare()  # listening before the first look: no commit falls in between
        failing: str | None = None
        logged_at = 0.0
        try:
            while not stop.is_set():
                try:
                    taken = self.relay_once()
                except Exception as exc:  # the database or both engines down: keep trying
                    reason = one_line(exc)
                    if reason != failing or time.monotonic() - logged_at >= REPEAT_LOG_SECONDS:
                        hint = " (run `jobyard db upgrade`)" if outbox.TABLE in reason else ""
                        log.warning("dispatch relay pass failed: %s%s", reason, hint)
                        failing, logged_at = reason, time.monotonic()
                    stop.wait(SAFETY_POLL)
                    continue
                if failing is not None:
                    log.warning("dispatch relay works again")
                    failing = None
                if taken < self.batch:
                    waker.wait(stop)
        finally:
            waker.close()


def submission_of(entry: outbox.Entry, now: float) -> Submission:
    """The job as its caller's dispatch checked it; a delay counts from that dispatch."""
    given = entry.options_dict()
    options = NO_OPTIONS
    if given:
        delay = given.get("delay")
        if delay:
            delay = max(0.0, entry.enqueued_at + delay - now) or None
        options = DispatchOptions(
            delay=delay, webhook_url=given.get("webhook_url"), retry=given.get("retry"),
            priority=given.get("priority") or 0, after=given.get("after"),
        )  # fmt: skip
        if options == NO_OPTIONS:
            options = NO_OPTIONS
    return Submission(
        entry.job_id, entry.name, entry.queue,
        crypto.unseal(entry.job_id, json.loads(entry.payload)), options,
        payload_json=entry.payload.encode(),  # sealed, with encryption on: engines keep it so
        trace=given.get(OUTBOX_TRACE),
    )  # fmt: skip


def backoff(attempts: int) -> float:
    """Seconds before a row no engine took is tried again: 0.5, 1, 2, ... up to MAX_BACKOFF."""
    return min(MAX_BACKOFF, 0.5 * float(2 ** min(attempts, 10)))


def record_sent(
    connection: Connection, sent: list[tuple[outbox.Entry, JobHandle]], now: float
) -> None:
    """The sent jobs' "queued" in the job log, in the relay's transaction, as `dispatch_job`'s
    own would be: dated when the caller dispatched, with the engine that took the job. Jobs on
    Dramatiq with no delay go in one statement (`QueuedBatch`), the rest one event each."""
    if not sent or not joblog.enabled():
        return
    batched: dict[tuple[float, str, str, str], list[tuple[str, bytes]]] = {}
    events: list[tuple[float, str, dict[str, Any]]] = []
    for entry, handle in sorted(sent, key=lambda item: item[0].job_id):
        delay = entry.options_dict().get("delay")
        if handle.fallback_reason is None and not delay:
            key = (entry.enqueued_at, entry.name, entry.queue, handle.engine)
            batched.setdefault(key, []).append((entry.job_id, entry.payload.encode()))
            continue
        events.append((entry.enqueued_at, entry.job_id, {
            "name": entry.name, "queue": entry.queue, "engine": handle.engine,
            "state": JobState.QUEUED, "payload": json.loads(entry.payload),
            "fallback_reason": handle.fallback_reason, "enqueued_at": entry.enqueued_at,
            "run_at": entry.enqueued_at + delay if delay else None,
        }))  # fmt: skip
    batches = [joblog.QueuedBatch(*key, jobs) for key, jobs in batched.items()]
    joblog.write_queued_in(connection, batches, events)


def _count(sent: list[tuple[outbox.Entry, JobHandle]]) -> None:
    dispatched = Counter((entry.name, entry.queue, handle.engine) for entry, handle in sent)
    for labels, count in dispatched.items():
        metrics.DISPATCHED.labels(*labels).inc(count)
    fallbacks = Counter(handle.fallback_reason for _, handle in sent if handle.fallback_reason)
    for reason, count in fallbacks.items():
        metrics.FALLBACKS.labels(reason).inc(count)


class _Waker:
    """Waits for the next commit that inserted outbox rows: LISTEN on PostgreSQL (its own
    connection, opened again when lost), a plain sleep on SQLite."""

    def __init__(self, url: str | None) -> None:
        engine = get_engine(url)
        self.postgresql = engine.dialect.name == "postgresql"
        self.conninfo = (
            make_url(engine.url).set(drivername="postgresql").render_as_string(hide_password=False)
            if self.postgresql
            else ""
        )
        self.poll = env.get_float(env.DISPATCH_RELAY_POLL)
        self.connection: Any = None

    def wait(self, stop: threading.Event) -> None:
        if not self.postgresql:
            stop.wait(self.poll)
            return
        try:
            listening = self._listening()
            woken = any(True for _ in listening.notifies(timeout=SAFETY_POLL, stop_after=1))
            if woken:  # one pass takes every row committed so far: drop their notifications
                for _ in listening.notifies(timeout=0.0):
                    pass
        except Exception as exc:  # PostgreSQL restarted: look after a pause, listen again
            log.warning("dispatch relay: LISTEN failed (%s); looking every %ss", one_line(exc),
                        SAFETY_POLL)  # fmt: skip
            self.close()
            stop.wait(SAFETY_POLL)

    def prepare(self) -> None:
        if self.postgresql:
            try:
                self._listening()
            except Exception as exc:  # wait() says so and tries again
                log.debug("dispatch relay: LISTEN not ready: %s", exc)

    def _listening(self) -> Any:
        if self.connection is None:
            import psycopg

            self.connection = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)
            self.connection.execute(f"LISTEN {outbox.NOTIFY_CHANNEL}")
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):  # already gone
                self.connection.close()
            self.connection = None


def start_relay_thread(stop: threading.Event) -> threading.Thread | None:
    """The process's relay, in a daemon thread, unless JOBYARD_DISPATCH_RELAY=false. A kill at
    any moment is safe (see the module docstring); `stop` ends it between passes."""
    if not env.get_bool(env.DISPATCH_RELAY):
        return None

    def run() -> None:
        from jobyard.dispatcher.dispatch import get_dispatcher

        OutboxRelay(get_dispatcher()).run(stop)

    thread = threading.Thread(target=run, name="jobyard-dispatch-relay", daemon=True)
    thread.start()
    return thread

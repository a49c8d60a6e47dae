"""The Dramatiq side of the job ctx: steps recorded in Redis, long sleeps as delayed messages."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy.exc import SQLAlchemyError

from jobyard.job_engine import tracing
from jobyard.job_engine.context import WAIT_SINCE_SUFFIX, BaseJobContext
from jobyard.job_engine.events import look_for_event
from jobyard.job_engine.waits import Waiting, next_look, outcomes_once_ended
from jobyard.queue.deadline import run_step
from jobyard.queue.store import JobStore, StartResult

#: Seconds a finished step's result is kept and its write retried while Redis is away.
RECORD_PATIENCE = 30.0
RECORD_RETRY_INTERVAL = 0.5
#: Seconds a run that may follow lost step records waits for the step journal to be readable
#: before running without it (see DramatiqContext._recall).
RECALL_PATIENCE = 30.0

log = logging.getLogger("jobyard.steps")
#: Sleeps up to this long happen in the worker thread; longer ones free it.
IN_THREAD_SLEEP_LIMIT = 1.0


#: A returned step whose Redis record waits (see DramatiqContext._record): name, result JSON,
#: timing JSON, and the wait for its journal commit (True: committed).
_Unrecorded = tuple[str, str, str, Callable[[], bool]]


class Suspend(BaseException):
    """Raised through the handler to park the job for `seconds`; BaseException so that a
    handler's `except Exception` cannot swallow it. `shown`: what a job parked until its next
    look for other jobs or an event shows meanwhile (None for a sleep); `announce`: this is
    the wait's first look, whose state event the job's history keeps (the later looks add none)."""

    def __init__(
        self, seconds: float, shown: Waiting | None = None, announce: bool = False
    ) -> None:
        super().__init__(seconds)
        self.seconds = seconds
        self.shown = shown
        self.announce = announce


class LostOwnership(BaseException):
    """The job belongs to Temporal, is finished, or this message is a stale duplicate."""


class Cancelled(BaseException):
    """Cancellation was asked for; the job stops at this step boundary."""


class DiedTooOften(BaseException):
    """A suspect's start found its attempts used up by deaths of its process (see
    jobyard.queue.reclaim): it is not run again."""

    def __init__(self, start: StartResult) -> None:
        super().__init__(start.died)
        self.start = start


class DramatiqContext(BaseJobContext):
    """Starts the run in Redis lazily, at the first step, sleep or progress: until then the
    handler has done nothing observable, and a job that never touches ctx finishes in a single
    Redis call (JobStore.complete)."""

    def __init__(
        self,
        store: JobStore,
        job_name: str,
        job_id: str,
        seq: int,
        resume: bool,
        on_start: Callable[[StartResult], None] | None = None,
        on_progress: Callable[[Any], None] | None = None,
        time_limit: float | None = None,
        journal: Callable[[str, str, str], Callable[[], bool]] | None = None,
        suspect_attempts: int = 0,
        recall: Callable[[str], dict[str, str]] | None = None,
    ) -> None:
        """`time_limit`: seconds this run may take; a step still running then is abandoned
        (see jobyard.queue.deadline). `journal(job_id, step, result_json)` starts keeping a
        returned step's result durably (jobyard.job_engine.db.steps) and returns the wait for
        it (True: committed). `suspect_attempts`: the job's attempts, when its message is a
        suspect's (see jobyard.queue.reclaim). `recall(job_id)`: the step results the journal
        kept, step -> JSON text; read only by a run whose start says Redis may have lost
        some."""
        super().__init__(job_id, job_name)
        self._recall_journal = recall
        self._suspect_attempts = suspect_attempts
        self._journal = journal
        self._time_limit = time_limit
        self._deadline = None if time_limit is None else time.monotonic() + time_limit
        self._store = store
        self._seq = seq
        self._resume = resume
        self._on_start = on_start
        self._on_progress = on_progress
        self._started: StartResult | None = None
        self._recorded: dict[str, str] = {}
        # Returned steps handed to the journal whose Redis record waits for the run's next
        # call (see _record), and those handed to the run's ending (see unrecorded).
        self._unrecorded: list[_Unrecorded] = []
        self._ending: list[_Unrecorded] = []

    @property
    def started(self) -> StartResult | None:
        return self._started

    @property
    def attempt(self) -> int:
        """Runs of this job so far, counted in Redis: a retry runs the job again from the top."""
        return self.start().attempts

    def start(self) -> StartResult:
        if self._started is None:
            result = self._store.start(
                self.job_id, self.job_name, self._seq, resume=self._resume,
                suspect_attempts=self._suspect_attempts,
            )  # fmt: skip
            if result.status == "exhausted":
                raise DiedTooOften(result)
            if result.status != "ok":
                raise LostOwnership(result.status)
            self._started, self._recorded = result, result.steps
            if result.may_have_lost and self._recall_journal is not None:
                # Redis's own records win: they hold the timings, and agree where both exist.
                self._recorded = {**self._recall(), **result.steps}
            if self._on_start is not None:
                self._on_start(result)
        return self._started

    def _recall(self) -> dict[str, str]:
        """The journal's step results, for a run that may follow lost Redis records. A
        database that cannot be read is waited for (RECALL_PATIENCE), as this run would
        otherwise run again steps that returned; past that the run goes on with Redis's records
        alone (logged): the journal is a backstop the writes also do without while the database
        is away (see db/steps.py), and a job must not wait on it for good."""
        assert self._recall_journal is not None
        deadline = time.monotonic() + RECALL_PATIENCE
        while True:
            try:
                return self._recall_journal(self.job_id)
            except SQLAlchemyError as exc:  # the database is away
                if time.monotonic() > deadline:
                    log.warning(
                        "job %s: step journal unreadable (%s): runs on Redis's step records "
                        "alone, a returned step they lost runs again", self.job_id, exc,
                    )  # fmt: skip
                    return {}
                time.sleep(RECORD_RETRY_INTERVAL)

    def _begin(self) -> None:
        """Before the handler's next use of ctx: the run started, and the steps whose Redis
        record was left for later recorded now (a job dropped or cancelled meanwhile stops
        here, at this step boundary, as it would have at the step's own record)."""
        self.start()
        self.record_unrecorded()

    def record_unrecorded(self) -> None:
        """Records in Redis the returned steps `_record` left for the run's next call, once
        the journal's commit of each is done (or failed: the record is then the only one).
        Raises LostOwnership or Cancelled as the step's own record would have."""
        while self._unrecorded:
            step, encoded, timing, committed = self._unrecorded[0]
            committed()
            outcome = self._record_patiently(step, encoded, timing)
            if outcome == "lost":
                raise LostOwnership(self.job_id)
            del self._unrecorded[0]
            if outcome == "cancel":
                raise Cancelled(self.job_id)

    def unrecorded(self) -> list[tuple[str, str, str]]:
        """The returned steps not yet recorded in Redis, (name, result JSON, timing JSON),
        handed to the run's ending: its call (finish) records them, and may go while the
        journal's commit of the last is still under way (the result is kept by whichever
        lands; a worker killed before either loses it, as before the commit alone). Call
        `settle_unrecorded` after that call."""
        handed, self._unrecorded = self._unrecorded, []
        self._ending += handed
        return [(step, encoded, timing) for step, encoded, timing, _ in handed]

    def settle_unrecorded(self, recorded: bool) -> None:
        """After the ending's call: waits for the journal's commits of the steps handed to
        it. `recorded`: whether that call recorded them (False: it failed, Redis away); a step
        the journal could not keep either is then recorded on its own, patiently."""
        ending, self._ending = self._ending, []
        for step, encoded, timing, committed in ending:
            if not committed() and not recorded:
                self._record_patiently(step, encoded, timing)

    def _record(self, step: str, encoded: str, timing: str = "", *, defer: bool = False) -> None:
        """`defer`: with a journal, the result's commit there and its Redis record both wait
        for the run's next call (the next step's record, after the commit; or the finish,
        which takes the record along): a round trip fewer per step, and the commit overlaps
        the rest of the run. The handler goes on meanwhile, but does nothing observable
        before that call (its I/O is in steps). Once committed, a run after this one finds
        the step in the journal (a redelivery is a second attempt, and a Redis restarted
        without this run's start marks the run in doubt: may_have_lost), and so does the
        rescue; a result the journal could not keep is recorded in Redis as before."""
        if defer and self._journal is not None:
            committed = self._journal(self.job_id, step, encoded)
            self._recorded[step] = encoded
            self._unrecorded.append((step, encoded, timing, committed))
            return
        # The database write and the Redis record go at once: a worker killed now loses no
        # more than it did with Redis alone, and the step goes on only once both are done (a
        # Redis that comes back empty may have lost the record; see the rescue).
        kept = self._journal(self.job_id, step, encoded) if self._journal else None
        try:
            outcome = self._record_patiently(step, encoded, timing)
        finally:
            if kept is not None:
                kept()
        if outcome == "lost":
            raise LostOwnership(self.job_id)
        self._recorded[step] = encoded
        if outcome == "cancel":
            raise Cancelled(self.job_id)

    def _record_patiently(self, step: str, encoded: str, timing: str = "") -> str:
        """A step that returned has done its side effect: keep its result and retry the write
        while Redis is away (the write is idempotent under the run's seq), rather than let the
        run fail and the step run again. Past RECORD_PATIENCE the error goes up (the message is
        requeued, see JobRunner)."""
        deadline = time.monotonic() + RECORD_PATIENCE
        while True:
            try:
                return self._store.record_step(self.job_id, self._seq, step, encoded, timing)
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(RECORD_RETRY_INTERVAL)

    async def _run_step(
        self, step: str, ref: str, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        self._begin()
        if step in self._recorded:
            return json.loads(self._recorded[step])
        began = time.time()
        if tracing.ACTIVE:
            with tracing.step(self.job_id, step, "dramatiq", **{tracing.JOB_NAME: self.job_name}):
                result = await self._call(step, fn, args)
        else:
            result = await self._call(step, fn, args)
        encoded = self.encode_result(step, result)
        timing = {"start": began, "end": time.time(), "attempt": self.attempt}
        self._record(step, encoded, json.dumps(timing), defer=True)
        return json.loads(encoded)

    async def _call(self, step: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """`fn(*args)`, given up at the run's deadline (see jobyard.queue.deadline)."""
        return await run_step(step, fn, args, self._deadline, self._time_limit or 0.0)

    async def _sleep(self, name: str, seconds: float) -> None:
        self._begin()
        if name in self._recorded:
            wake_at = float(json.loads(self._recorded[name]))
        else:
            began = time.time()
            wake_at = began + seconds
            timing = {"start": began, "end": wake_at, "attempt": self.attempt}
            self._record(name, json.dumps(wake_at), json.dumps(timing))
        remaining = wake_at - time.time()
        if remaining <= 0:
            return
        if remaining <= IN_THREAD_SLEEP_LIMIT:
            await asyncio.sleep(remaining)
            return
        raise Suspend(remaining)

    async def _wait_for_jobs(
        self, wait: str, job_ids: list[str], shown: Waiting
    ) -> list[dict[str, Any]]:
        """One look at the job log per run: every job ended -> their outcomes are recorded as
        `wait` and returned; else the job parks (Suspend: a delayed message, no thread held)
        until the next look, and resumes from the top past its recorded steps."""
        self.start()
        if wait in self._recorded:
            recorded: list[dict[str, Any]] = json.loads(self._recorded[wait])
            return recorded
        first = wait + WAIT_SINCE_SUFFIX not in self._recorded
        since = float(self.recorded(wait + WAIT_SINCE_SUFFIX, time.time()))
        try:
            outcomes = outcomes_once_ended(job_ids)
        except SQLAlchemyError as exc:  # the database is away: look again later
            log.warning("job %s: cannot read the job log for %s (%s)", self.job_id, wait, exc)
            outcomes = None
        now = time.time()
        if outcomes is None:
            raise Suspend(next_look(now - since), shown, announce=first)
        timing = {"start": since, "end": now, "attempt": self.attempt}
        self._record(wait, self.encode_result(wait, outcomes), json.dumps(timing))
        return outcomes

    async def _wait_for_event(
        self, record: str, wait: dict[str, Any], shown: Waiting
    ) -> dict[str, Any] | None:
        """One look per run, as `_wait_for_jobs`: the event found, or the timeout passed, is
        recorded as `record`; else the job parks until the next look (or its timeout)."""
        self.start()
        if record in self._recorded:
            recorded: dict[str, Any] | None = json.loads(self._recorded[record])
            return recorded
        first = record + WAIT_SINCE_SUFFIX not in self._recorded
        since = float(self.recorded(record + WAIT_SINCE_SUFFIX, time.time()))
        now = time.time()  # before the look: an event sent by now is in it
        timeout = wait["timeout"]
        try:
            event = look_for_event(wait, since)
        except SQLAlchemyError as exc:  # the database is away: look again later
            log.warning("job %s: cannot read events for %s (%s)", self.job_id, record, exc)
            raise Suspend(next_look(now - since), shown, announce=first) from None
        if event is None and (timeout is None or now < since + timeout):
            look = next_look(now - since)
            look = look if timeout is None else min(look, since + timeout - now)
            raise Suspend(look, shown, announce=first)
        timing = {"start": since, "end": time.time(), "attempt": self.attempt}
        self._record(record, json.dumps(event), json.dumps(timing))
        return event

    async def _progress(self, value: Any, encoded: str) -> None:
        self._begin()
        self._store.record_progress(self.job_id, self._seq, encoded)
        if self._on_progress is not None:
            self._on_progress(value)

    def recorded(self, step: str, value: Any) -> Any:
        """`value`, recorded as `step` the first time (a flow-control decision, e.g. a debounced
        run's payload): a retry gets the recorded one back."""
        self._begin()
        if step in self._recorded:
            return json.loads(self._recorded[step])
        encoded = self.encode_result(step, value)
        self._record(step, encoded)
        return json.loads(encoded)

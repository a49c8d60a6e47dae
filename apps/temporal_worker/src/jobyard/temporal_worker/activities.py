"""The activities behind ctx.run (any step function, by import path), the Redis claim and the
job log's events. The worker makes one JobActivities with what they need (worker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from jobyard.dispatcher.engines.temporal import contract
from jobyard.job_engine import JobState, PermanentError, crypto, env, resolve_step, tracing
from jobyard.job_engine.context import encode_json
from jobyard.job_engine.db import joblog
from jobyard.job_engine.events import look_for_event
from jobyard.job_engine.lifecycle import FINAL_STATES, job_event, progress_event
from jobyard.job_engine.waits import outcomes_once_ended
from jobyard.temporal_worker.claims import ClaimStore, ClaimUnavailable
from jobyard.temporal_worker.faultlog import FaultLog
from jobyard.temporal_worker.journal import StepRecords
from jobyard.temporal_worker.permits import permit

STEP_ACTIVITY = contract.STEP_ACTIVITY
#: How long a step's activity may go without a heartbeat before Temporal retries it elsewhere
#: (its worker died); a running step heartbeats every third of it.
STEP_HEARTBEAT_TIMEOUT = timedelta(seconds=6)
CLAIM_ACTIVITY = "jobyard.claim"
EVENT_ACTIVITY = "jobyard.event"
#: One look at the job log for the endings of the jobs a job waits for (waits.py).
OUTCOMES_ACTIVITY = "jobyard.outcomes"
#: One look for the event a ctx.wait_for_event takes (jobyard.job_engine.events).
EVENT_LOOK_ACTIVITY = "jobyard.event_look"
#: Redis down during a claim is an operator's fact (warning); a step that raised is the job's
#: own outcome, retried or recorded (info, as the Dramatiq worker logs it).
CLAIM_FAULTS = FaultLog(logging.getLogger("jobyard.claim"))
STEP_FAULTS = FaultLog(logging.getLogger("jobyard.steps"), level=logging.INFO)
log = logging.getLogger("jobyard.joblog")


class JobActivities:
    """The worker's activities, bound to the claim store and the step journal it was given.

    Failures they expect (Redis down for a claim, a step that raised) reach Temporal as BENIGN
    application errors, which temporalio logs at debug level instead of a warning with the
    whole chained traceback; this class logs one line per cause per interval (FaultLog)."""

    def __init__(self, claims: ClaimStore, journal: StepRecords | None) -> None:
        self.claims = claims
        #: Returned steps' results, read before a step runs (None: the journal is off).
        self.journal = journal

    def all(self) -> list[Any]:
        """The main task queue's: the claim, the events and the permits (local), and steps
        scheduled there before each queue's steps had a task queue of their own."""
        return [
            self.run_step,
            self.claim_from_redis,
            record_event,
            permit,
            look_for_outcomes,
            look_for_sent_event,
        ]

    def steps(self) -> list[Any]:
        """A queue's step task queue's."""
        return [self.run_step]

    @activity.defn(name=STEP_ACTIVITY)
    async def run_step(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one step, unless the journal holds its result (the step returned before and its
        completion never reached Temporal: a server crash, a worker killed right after, a
        partition); its attempt number comes back so the job can report attempts."""
        attempt = activity.info().attempt
        job_id, step = request["job_id"], request["step"]
        beating = asyncio.create_task(_heartbeat(STEP_HEARTBEAT_TIMEOUT.total_seconds() / 3))
        try:
            recorded = await self._recorded(job_id, step) if attempt > 1 else None
            if recorded is not None:
                return {"value": json.loads(recorded), "attempt": attempt}
            value, encoded = await self._run(request, attempt)
            if self.journal is not None:  # kept before Temporal hears of it
                await asyncio.to_thread(self.journal.record, job_id, step, encoded)
        finally:
            beating.cancel()
        return {"value": value, "attempt": attempt}

    async def _recorded(self, job_id: str, step: str) -> str | None:
        """Read on retries only: Temporal counts every execution it hands out, so one that
        follows an execution whose completion it never got is attempt 2 or later; the first
        attempt has nothing to find and skips the read (3.4 ms through the ORM, measured on
        PostgreSQL here)."""
        if self.journal is None:
            return None
        try:
            recorded = await asyncio.to_thread(self.journal.recorded, job_id, step)
        except Exception as exc:  # the database is away: run the step, as if never journalled
            STEP_FAULTS.fault(
                "step journal unreadable", f"job {job_id} step {step!r} runs: {_describe(exc)}"
            )
            return None
        if recorded is not None:
            STEP_FAULTS.fault(
                "step returned before, not run again",
                f"job {job_id} step {step!r}: its result is read from the step journal",
            )
        return recorded

    async def _run(self, request: dict[str, Any], attempt: int) -> tuple[Any, str]:
        """The step's value and its JSON text."""
        fn = resolve_step(request["fn"])
        try:
            if tracing.ACTIVE:
                with tracing.step(
                    request["job_id"], request["step"], "temporal", **{"jobyard.attempt": attempt}
                ):
                    value = await _call(fn, request["args"])
            else:
                value = await _call(fn, request["args"])
            # JSON data only, as the other engines check
            encoded = encode_json(f"step {request['step']!r}'s result", value)
        except Exception as exc:  # named as Dramatiq names a job's error: "Class: message"
            error = f"{type(exc).__name__}: {exc}"
            shown = crypto.loggable(error, type(exc).__name__)  # no message with encryption on
            STEP_FAULTS.fault(
                f"step {request['fn']} raised {type(exc).__name__}",
                f"job {request['job_id']} step {request['step']!r} attempt {attempt}: {shown}",
            )
            raise ApplicationError(
                error,
                {"attempts": attempt},
                type=type(exc).__name__,
                non_retryable=isinstance(exc, PermanentError),
                category=ApplicationErrorCategory.BENIGN,
            ) from exc
        return value, encoded

    @activity.defn(name=CLAIM_ACTIVITY)
    async def claim_from_redis(self, request: dict[str, Any]) -> dict[str, Any]:
        """Mark the job Temporal's in Redis, removing a queued Dramatiq message in the same step.

        {"status": "claimed"} or {"status": "lost", "state": ...} when Dramatiq already started
        it. A Redis error fails the attempt; the workflow's retry policy decides whether to wait.
        """
        job_id = request["job_id"]
        try:
            claim = await asyncio.to_thread(
                self.claims.claim, job_id, request["name"], request["queue"]
            )
        except ClaimUnavailable as exc:
            CLAIM_FAULTS.fault("claim: Redis unavailable", f"job {job_id}: {exc}")
            raise ApplicationError(
                f"Redis unavailable: {exc}",
                type="RedisUnavailable",
                category=ApplicationErrorCategory.BENIGN,
            ) from exc
        if claim.claimed:
            return {"status": "claimed", "state": None}
        return {"status": "lost", "state": claim.state}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


async def _call(fn: Any, args: list[Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    return await _in_step_thread(fn, *args)


class StepThreads:
    """A thread pool per task queue for sync steps, sized to that task queue's activity slots
    (worker.py sets the sizes: a jobyard queue's concurrency): with asyncio's default pool
    (cpu+4 threads) an accepted step waits for a thread while others run, and a step retried
    after its worker died queues behind them (tens of seconds, not the few its heartbeat
    timeout promises). One pool per queue, so one queue's steps never wait for another's
    threads. Used from the event loop's thread only."""

    def __init__(self) -> None:
        self._sizes: dict[str, int] = {}
        self._pools: dict[str, ThreadPoolExecutor] = {}

    def size(self, task_queue: str, threads: int) -> None:
        self._sizes[task_queue] = threads

    def pool(self, task_queue: str) -> ThreadPoolExecutor:
        pool = self._pools.get(task_queue)
        if pool is None:
            # A task queue no size was set for: the main one (steps scheduled there before
            # steps had their queue's task queue), with its TEMPORAL_STEP_CONCURRENCY slots.
            threads = self._sizes.get(task_queue) or env.get_int(env.TEMPORAL_STEP_CONCURRENCY)
            pool = ThreadPoolExecutor(threads, thread_name_prefix="jobyard-step")
            self._pools[task_queue] = pool
        return pool


STEP_THREADS = StepThreads()


def _in_step_thread(fn: Any, *args: Any) -> asyncio.Future[Any]:
    """`fn(*args)` in a thread of the pool of the step's task queue."""
    pool = STEP_THREADS.pool(activity.info().task_queue)
    context = contextvars.copy_context()  # as asyncio.to_thread does
    return asyncio.get_running_loop().run_in_executor(pool, context.run, fn, *args)


async def _heartbeat(every: float) -> None:
    # Who runs the step: should this process die under it, the workflow's heartbeat timeout
    # carries the last details, and the job's error names the host and process.
    where = (socket.gethostname(), os.getpid())
    while True:
        activity.heartbeat(*where)
        await asyncio.sleep(every)


@activity.defn(name=OUTCOMES_ACTIVITY)
async def look_for_outcomes(job_ids: list[str]) -> list[dict[str, Any]] | None:
    """The jobs' outcomes once every one ended, else None (run as a local activity; a database
    that cannot be read fails the attempt, which is retried)."""
    return await asyncio.to_thread(outcomes_once_ended, job_ids)


@activity.defn(name=EVENT_LOOK_ACTIVITY)
async def look_for_sent_event(look: dict[str, Any]) -> dict[str, Any] | None:
    """The event the wait takes, else None (run as a local activity, retried like
    look_for_outcomes). `look`: the wait's fields and "began"."""
    wait = dict(look)
    began = wait.pop("began")
    return await asyncio.to_thread(look_for_event, wait, began)


@activity.defn(name=EVENT_ACTIVITY)
async def record_event(event: dict[str, Any]) -> None:
    """Job log, metrics and webhook event of a state change (run as a local activity)."""
    event = dict(event)
    job_id, name, state = event.pop("job_id"), event.pop("name"), event.pop("state")
    enqueued_at = event.pop("enqueued_at", None)
    if tracing.ACTIVE and state == JobState.RUNNING and enqueued_at is not None:
        attributes = tracing.job_attributes(job_id, name, event.get("queue"), "temporal")
        with contextlib.suppress(Exception):  # a tracing fault must not fail the bookkeeping
            tracing.completed_span(
                tracing.QUEUE_WAIT, attributes, start=enqueued_at, end=event.get("started_at")
            )
    if state == "progress":
        await asyncio.to_thread(
            progress_event, job_id, name, event["progress"], event["seq"], event.get("webhook_url")
        )
        return
    await asyncio.to_thread(
        job_event, job_id, name, state, engine="temporal", enqueued_at=enqueued_at, **event
    )
    if state in FINAL_STATES:
        await asyncio.to_thread(write_ending)


def write_ending() -> None:
    """The job log's writer flushed now, with the ending just recorded, before the workflow
    completes. Left to the writer's next interval, the ending lived only in this process's
    buffer after Temporal had the job final: a worker killed within the interval took it along,
    and the job stayed unfinished in the job log for good (the soak's "final in its engine, not
    in the job log", issue 29). Written here, a kill before the write fails the workflow task,
    and the worker that replays it records the ending again. A database that cannot take it
    now leaves it buffered, as any event (written when the database answers, unless this
    process dies first): a job's ending does not wait for the job log."""
    current = joblog.writer()
    if current is None:
        return
    try:
        current.flush()
    except Exception as exc:  # the writer keeps it and logs its own failures
        log.debug("job log ending not written at once: %s", exc)

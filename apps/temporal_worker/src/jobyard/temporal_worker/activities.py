"""The activities behind ctx.run (any step function, by import path) and the Redis claim."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from jobyard.dispatcher import EngineUnavailable, get_dispatcher
from jobyard.dispatcher.engines import ReleaseStatus
from jobyard.dispatcher.engines.temporal import contract
from jobyard.job_engine import PermanentError, env, resolve_step, tracing
from jobyard.job_engine.context import encode_json
from jobyard.job_engine.lifecycle import job_event, progress_event

STEP_ACTIVITY = contract.STEP_ACTIVITY
#: How long a step's activity may go without a heartbeat before Temporal retries it elsewhere
#: (its worker died); a running step heartbeats every third of it.
STEP_HEARTBEAT_TIMEOUT = timedelta(seconds=6)
CLAIM_ACTIVITY = "jobyard.claim"


@activity.defn(name=STEP_ACTIVITY)
async def run_step(request: dict[str, Any]) -> dict[str, Any]:
    """Run one step; its attempt number comes back so the job can report attempts."""
    attempt = activity.info().attempt
    fn = resolve_step(request["fn"])
    beating = asyncio.create_task(_heartbeat(STEP_HEARTBEAT_TIMEOUT.total_seconds() / 3))
    try:
        if tracing.ACTIVE:
            with tracing.step(
                request["job_id"], request["step"], "temporal", **{"jobyard.attempt": attempt}
            ):
                value = await _call(fn, request["args"])
        else:
            value = await _call(fn, request["args"])
        encode_json(f"step {request['step']!r}'s result", value)  # as the other engines check
    except PermanentError as exc:  # named as Dramatiq names a job's error: "Class: message"
        raise ApplicationError(
            f"{type(exc).__name__}: {exc}",
            {"attempts": attempt},
            type=type(exc).__name__,
            non_retryable=True,
        ) from exc
    except Exception as exc:
        raise ApplicationError(
            f"{type(exc).__name__}: {exc}", {"attempts": attempt}, type=type(exc).__name__
        ) from exc
    finally:
        beating.cancel()
    return {"value": value, "attempt": attempt}


async def _call(fn: Any, args: list[Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    return await _in_step_thread(fn, *args)


_step_threads: ThreadPoolExecutor | None = None


def _in_step_thread(fn: Any, *args: Any) -> asyncio.Future[Any]:
    """`fn(*args)` in a thread of the steps' own pool, sized to the worker's activity slots
    (TEMPORAL_STEP_CONCURRENCY): with asyncio's default pool (cpu+4 threads) an accepted step
    waits for a thread while others run, and a step retried after its worker died queues
    behind them (tens of seconds, not the few its heartbeat timeout promises)."""
    global _step_threads
    if _step_threads is None:
        _step_threads = ThreadPoolExecutor(
            env.get_int(env.TEMPORAL_STEP_CONCURRENCY), thread_name_prefix="jobyard-step"
        )
    context = contextvars.copy_context()  # as asyncio.to_thread does
    return asyncio.get_running_loop().run_in_executor(_step_threads, context.run, fn, *args)


async def _heartbeat(every: float) -> None:
    while True:
        activity.heartbeat()
        await asyncio.sleep(every)


@activity.defn(name=CLAIM_ACTIVITY)
async def claim_from_redis(request: dict[str, Any]) -> dict[str, Any]:
    """Mark the job Temporal's in Redis, removing a queued Dramatiq message in the same step.

    {"status": "claimed"} or {"status": "lost", "state": ...} when Dramatiq already started it.
    A Redis error fails the attempt; the workflow's retry policy decides whether to wait.
    """
    dramatiq = get_dispatcher().dramatiq
    try:
        released = await asyncio.to_thread(
            dramatiq.release, request["job_id"], request["name"], request["queue"]
        )
    except EngineUnavailable as exc:
        raise ApplicationError(f"Redis unavailable: {exc}", type="RedisUnavailable") from exc
    if released.status == ReleaseStatus.RELEASED:
        return {"status": "claimed", "state": None}
    return {"status": "lost", "state": released.state}


EVENT_ACTIVITY = "jobyard.event"


@activity.defn(name=EVENT_ACTIVITY)
async def record_event(event: dict[str, Any]) -> None:
    """Job log, metrics and webhook event of a state change (run as a local activity)."""
    event = dict(event)
    job_id, name, state = event.pop("job_id"), event.pop("name"), event.pop("state")
    enqueued_at = event.pop("enqueued_at", None)
    if tracing.ACTIVE and state == "running" and enqueued_at is not None:
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

"""What happens when a job changes state, on either engine: the job log row, the metrics and,
when the dispatcher was given a `webhook_url`, an event delivered by `webhook.deliver`."""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from jobyard.job_engine import children, metrics, tracing
from jobyard.job_engine.db import joblog
from jobyard.job_engine.states import FINAL_STATES as FINAL_STATES  # imported from here too
from jobyard.job_engine.states import JobState

log = logging.getLogger("jobyard.lifecycle")

WEBHOOK_JOB = "webhook.deliver"


@functools.cache
def _labelled(metric: Any, *values: str) -> Any:
    """A metric's child for these label values, looked up once (labels() locks and validates)."""
    return metric.labels(*values)


def job_event(
    job_id: str,
    name: str,
    state: str,
    *,
    queue: str | None,
    engine: str,
    attempts: int | None = None,
    started_at: float | None = None,
    result: Any = None,
    error: str | None = None,
    error_class: str | None = None,
    traceback: str | None = None,
    payload: Any = None,
    webhook_url: str | None = None,
    logged: bool = False,
    run_at: float | None = None,
    enqueued_at: float | None = None,
    display_state: str | None = None,
    waiting_reason: str | None = None,
    announced: bool = False,
) -> None:
    """Record a state change. Never raises: bookkeeping must not fail a job.
    `run_at`: when a job waiting on a timer (a durable sleep, a retry) runs next.
    `display_state`, `waiting_reason`: why a job a flow-control limit holds waits (its state
    event in the job log says so, for GET /jobs/{id}/events); `announced`: a running job that
    begins to wait for jobs or an event, an event of its history though its state is the same.
    `enqueued_at`: when the engine took the job, if known (dates its dispatch in the job log
    when this change gets there first).
    `logged`: the engine already put the change in the job log's outbox (a Dramatiq worker
    does, in the Lua call that made it), so only metrics and the webhook event are left."""
    now = time.time()
    final = state in FINAL_STATES
    try:
        if tracing.ACTIVE:  # on the run's span (on Temporal, the event activity's)
            tracing.event(
                f"jobyard.{state}", **{"jobyard.attempts": attempts, "jobyard.error": error}
            )
        if not logged:
            joblog.record(
                job_id,
                ts=now,
                name=name,
                queue=queue,
                engine=engine,
                state=state,
                attempts=attempts,
                started_at=started_at,
                finished_at=now if final else None,
                duration_ms=int((now - started_at) * 1000) if final and started_at else None,
                result=result if state == JobState.SUCCEEDED else None,
                error_class=error_class,
                error_message=(error or "")[:2000] or None,
                error_traceback=traceback,
                payload=payload,
                run_at=run_at,
                enqueued_at=enqueued_at,
                display_state=display_state,
                waiting_reason=waiting_reason,
                announced=announced or None,
            )
        labels = (name, queue or "", engine)
        if final:
            _labelled(metrics.JOBS, *labels, state).inc()
            if started_at:
                _labelled(metrics.DURATION, *labels).observe(max(0.0, now - started_at))
        if state == JobState.RETRYING:
            _labelled(metrics.RETRIES, *labels).inc()
        if state == JobState.DEAD:
            _labelled(metrics.DEAD_LETTERS, *labels).inc()
        if webhook_url and final:
            body = {"job_id": job_id, "name": name, "event": state, "engine": engine,
                    "attempts": attempts, "result": result if state == JobState.SUCCEEDED else None,
                    "error": error}  # fmt: skip
            notify(webhook_url, body, f"{job_id}:event:{state}")
    except Exception:
        log.exception("could not record %s of job %s", state, job_id)


def progress_event(
    job_id: str, name: str, value: Any, seq: int, webhook_url: str | None, *, logged: bool = False
) -> None:
    try:
        if not logged:
            joblog.record(job_id, name=name, progress=value)
        if webhook_url:
            body = {"job_id": job_id, "name": name, "event": "progress", "progress": value}
            notify(webhook_url, body, f"{job_id}:progress:{seq}")
    except Exception:
        log.exception("could not record progress of job %s", job_id)


def dispatched_event(
    job_id: str,
    name: str,
    queue: str,
    engine: str,
    payload: Any,
    fallback_reason: str | None,
    enqueued_at: float | None = None,
    run_at: float | None = None,
    hold: tuple[str, str] | None = None,
) -> None:
    """`enqueued_at`: when dispatch began (an engine may start the job before dispatch returns);
    `run_at`: when a delayed (or held) job may start; `hold`: (display_state, waiting_reason)
    of a job a flow-control limit holds from its dispatch."""
    try:
        ts = enqueued_at or time.time()
        display_state, waiting_reason = hold or (None, None)
        joblog.record(
            job_id, ts=ts, name=name, queue=queue, engine=engine, state=JobState.QUEUED,
            payload=payload, fallback_reason=fallback_reason, enqueued_at=ts, run_at=run_at,
            display_state=display_state, waiting_reason=waiting_reason,
        )  # fmt: skip
        _labelled(metrics.DISPATCHED, name, queue, engine).inc()
        if fallback_reason:
            _labelled(metrics.FALLBACKS, fallback_reason).inc()
    except Exception:
        log.exception("could not record dispatch of job %s", job_id)


#: Jobs per job log buffer entry of `dispatched_batch_event` (bounds one flush statement's size).
QUEUED_BATCH_JOBS = 5000


def dispatched_batch_event(
    name: str, queue: str, engine: str, jobs: list[tuple[str, bytes]], enqueued_at: float
) -> None:
    """`dispatched_event` of jobs one call dispatched to `engine` at `enqueued_at`, with no
    fallback reason or delay: the same rows and events, recorded as one job log entry per
    QUEUED_BATCH_JOBS jobs (`joblog.QueuedBatch`). `jobs`: (job id, its payload's JSON text)."""
    try:
        current = joblog.writer()
        if current is not None:
            for at in range(0, len(jobs), QUEUED_BATCH_JOBS):
                chunk = jobs[at : at + QUEUED_BATCH_JOBS]
                current.record_queued(joblog.QueuedBatch(enqueued_at, name, queue, engine, chunk))
        _labelled(metrics.DISPATCHED, name, queue, engine).inc(len(jobs))
    except Exception:
        log.exception("could not record dispatch of %d %s jobs", len(jobs), name)


def notify(url: str, body: dict[str, Any], event_id: str) -> None:
    """Start the `webhook.deliver` job that tells the web app; its id makes it start once."""
    children.dispatch_child(WEBHOOK_JOB, {"url": url, "body": body}, event_id)

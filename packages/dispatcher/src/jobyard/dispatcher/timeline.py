"""A job's step timeline, whichever engines ran it: each step's start, duration, attempts and
engine, and each durable sleep, oldest first (the dashboard's job page).

Dramatiq keeps a finished step's timing beside its result in Redis (STEP_TIMING_PREFIX, written
in the same call); Temporal's history has its activities and timers. A job moved from Dramatiq
to Temporal shows the steps it finished on Dramatiq, then those Temporal ran.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from temporalio.service import RPCError, RPCStatusCode

from jobyard.dispatcher.dispatch import get_dispatcher
from jobyard.dispatcher.engines.temporal.contract import STEP_ACTIVITY
from jobyard.dispatcher.engines.temporal.engine import TemporalEngine
from jobyard.job_engine.context import SLEEP_STEP_PREFIX, STEP_TIMING_PREFIX
from jobyard.job_engine.states import JobState

__all__ = ["dramatiq_timeline", "job_timeline", "without_timings"]

#: Most history events read for one timeline (a job with thousands of steps shows its first).
MAX_HISTORY_EVENTS = 5000


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def _entry(kind: str, name: str, engine: str, start: float | None, end: float | None,
           **extra: Any) -> dict[str, Any]:  # fmt: skip
    duration = round((end - start) * 1000) if start is not None and end is not None else None
    return {"kind": kind, "name": name, "engine": engine, "started_at": _iso(start),
            "finished_at": _iso(end), "duration_ms": duration, **extra}  # fmt: skip


def dramatiq_timeline(steps: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries from a Dramatiq job's recorded steps (see jobyard.queue.context), shaped as
    Temporal's: a sleep is "sleep <n>", sleeping until its wake time, then slept."""
    entries = []
    now = time.time()
    for key, value in steps.items():
        if key.startswith(STEP_TIMING_PREFIX) and isinstance(value, dict):
            step = key[len(STEP_TIMING_PREFIX) :]
            if not step.startswith(SLEEP_STEP_PREFIX):  # a sleep's entry is made from its wake time
                entries.append(_entry(
                    "step", step, "dramatiq", value.get("start"), value.get("end"),
                    attempts=value.get("attempt"), state=JobState.SUCCEEDED,
                ))  # fmt: skip
        elif key.startswith(SLEEP_STEP_PREFIX) and isinstance(value, int | float):
            entries.append(_dramatiq_sleep(key, float(value), steps, now))
    return entries


def _dramatiq_sleep(key: str, wake: float, steps: dict[str, Any], now: float) -> dict[str, Any]:
    timing = steps.get(STEP_TIMING_PREFIX + key)
    start = timing.get("start") if isinstance(timing, dict) else None  # older records: none
    slept = wake <= now
    return _entry(
        "sleep", f"sleep {key[len(SLEEP_STEP_PREFIX) :]}", "dramatiq", start,
        wake if slept else None, state="slept" if slept else "sleeping", wake_at=_iso(wake),
    )  # fmt: skip


async def _temporal_timeline(engine: TemporalEngine, job_id: str) -> list[dict[str, Any]]:
    client = await engine.client()
    handle = client.get_workflow_handle(job_id)
    scheduled: dict[int, dict[str, Any]] = {}
    timers: dict[str, dict[str, Any]] = {}
    entries: list[dict[str, Any]] = []
    seen = 0
    async for event in handle.fetch_history_events():
        seen += 1
        if seen > MAX_HISTORY_EVENTS:
            break
        at = event.event_time.ToDatetime(tzinfo=UTC).timestamp()
        if event.HasField("activity_task_scheduled_event_attributes"):
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name != STEP_ACTIVITY:
                continue  # the claim of a job moved from Dramatiq
            decoded = await client.data_converter.decode(list(attrs.input.payloads))
            step = decoded[0].get("step") if decoded and isinstance(decoded[0], dict) else None
            entry = _entry(
                "step", str(step), "temporal", at, None, attempts=1, state=JobState.RUNNING
            )
            scheduled[event.event_id] = entry
            entries.append(entry)
        elif event.HasField("activity_task_started_event_attributes"):
            started = event.activity_task_started_event_attributes
            running = scheduled.get(started.scheduled_event_id)
            if running is not None:
                running["attempts"] = started.attempt
        elif event.HasField("activity_task_completed_event_attributes"):
            _close(
                scheduled, event.activity_task_completed_event_attributes, at, JobState.SUCCEEDED
            )
        elif event.HasField("activity_task_failed_event_attributes"):
            _close(scheduled, event.activity_task_failed_event_attributes, at, JobState.FAILED)
        elif event.HasField("activity_task_timed_out_event_attributes"):
            _close(scheduled, event.activity_task_timed_out_event_attributes, at, "timed out")
        elif event.HasField("activity_task_canceled_event_attributes"):
            _close(scheduled, event.activity_task_canceled_event_attributes, at, JobState.CANCELLED)
        elif event.HasField("timer_started_event_attributes"):
            timer = event.timer_started_event_attributes
            wake = at + timer.start_to_fire_timeout.ToTimedelta().total_seconds()
            entry = _entry("sleep", f"sleep {len(timers) + 1}", "temporal", at, None,
                           state="sleeping", wake_at=_iso(wake))  # fmt: skip
            timers[timer.timer_id] = entry
            entries.append(entry)
        elif event.HasField("timer_fired_event_attributes"):
            fired = timers.get(event.timer_fired_event_attributes.timer_id)
            if fired is not None:
                fired.update(_entry("sleep", fired["name"], "temporal",
                                    _ts(fired["started_at"]), at, state="slept"))  # fmt: skip
    return entries


def _ts(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def _close(scheduled: dict[int, dict[str, Any]], attrs: Any, at: float, state: str) -> None:
    entry = scheduled.get(attrs.scheduled_event_id)
    if entry is not None:
        start = _ts(entry["started_at"])
        entry.update(
            state=state, finished_at=_iso(at),
            duration_ms=round((at - start) * 1000) if start is not None else None,
        )  # fmt: skip


def job_timeline(job_id: str, steps: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The job's steps and sleeps on every engine that ran some, by start time. `steps`: the
    Dramatiq steps already read (get_job_steps), to save a Redis call."""
    entries = dramatiq_timeline(steps or {})
    temporal = get_dispatcher().temporal
    if isinstance(temporal, TemporalEngine):
        try:
            entries += temporal.run(_temporal_timeline(temporal, job_id), temporal.timeout * 3)
        except RPCError as exc:  # no such workflow: the job never ran on Temporal
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
    entries.sort(key=lambda e: e["started_at"] or e["finished_at"] or "")
    return entries


def without_timings(steps: dict[str, Any]) -> dict[str, Any]:
    """The recorded steps as the job's detail shows them (the timings are in the timeline)."""
    return {k: v for k, v in steps.items() if not k.startswith(STEP_TIMING_PREFIX)}

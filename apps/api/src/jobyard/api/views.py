"""Views: what a job looks like over HTTP. The engine's live status merged with the job log's
record, states as a person reads them, and the summaries (and pages of them) listings show."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from jobyard.api.responses import SafeJSONResponse, unprocessable, validation_detail
from jobyard.dispatcher import get_job_record, get_job_steps, list_jobs
from jobyard.dispatcher.lifecycle import Cursor, cursor_of
from jobyard.dispatcher.timeline import without_timings
from jobyard.job_engine.flow.waiting import DISPLAY_STATES as FLOW_DISPLAY_STATES
from jobyard.job_engine.states import JobState
from jobyard.job_engine.waits import is_waiting

log = logging.getLogger("jobyard.api")

#: Listings carry summaries: what a table row shows. Payloads, results and tracebacks can be
#: large and private; GET /jobs/{id} has them.
SUMMARY_OMITS = ("payload", "result", "progress", "error_traceback")
SUMMARY_ERROR_CHARS = 300
#: How a job waiting on a timer (run_at in the future) reads: see readable.
WAITING_STATES: dict[str, str] = {
    JobState.RUNNING: "sleeping",
    JobState.QUEUED: "delayed",
    JobState.RETRYING: "retrying",
}


def job_log_view(job_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """The job log's record and the recorded steps, or why they could not be read.

    The engines are the authority on a job's state; the log only adds history. A database
    outage must not turn a working status lookup into a 500, so its error is reported inline
    (in general terms: the exception's text names internal hosts).
    """
    try:
        record = get_job_record(job_id)
        steps = without_timings(get_job_steps(job_id))
    except Exception:
        log.warning("job log unavailable for %s", job_id, exc_info=True)
        return None, None, "the job log is unavailable"
    return (record.as_dict() if record is not None else None), steps, None


def merge(status_: dict[str, Any] | None, record: dict[str, Any] | None) -> dict[str, Any]:
    """The record's history overlaid with the engine's live answer (state, attempts, result,
    progress), except where the engine has nothing to say."""
    merged = dict(record or {})
    for key, value in (status_ or {}).items():
        if value is not None or key not in merged:
            merged[key] = value
    return merged


def readable(job: dict[str, Any]) -> dict[str, Any]:
    """Adds `display_state`, the state as a person reads it: a running job waiting on its
    durable sleep is "sleeping", a queued job waiting for its dispatch delay is "delayed", until
    `run_at` (an ISO time; for a retrying job, its next attempt). A job held by a flow-control
    limit keeps the engine's (`throttled`, `waiting for slot`, `debouncing`, `collapsed`), with
    its `waiting_reason`."""
    run_at = job.get("run_at")
    if isinstance(run_at, int | float):
        run_at = job["run_at"] = datetime.fromtimestamp(run_at, UTC).isoformat()
    waiting = False
    if isinstance(run_at, str):
        try:
            waiting = datetime.fromisoformat(run_at) > datetime.now(UTC)
        except ValueError:
            waiting = False
    state = job.get("state")
    if not waiting and state in (JobState.QUEUED, JobState.RUNNING):
        job["run_at"] = None  # past: the job is not waiting on it any more
    shown = job.get("display_state")
    if shown not in FLOW_DISPLAY_STATES and not is_waiting(shown, state or ""):
        job["display_state"] = WAITING_STATES.get(state or "", state) if waiting else state
    return job


def listing(request: Request, limit: int, cursor: str | None, **filters: Any) -> JSONResponse:
    """A page of summaries; the cursor of the next page in X-Next-Cursor and Link."""
    try:
        after = Cursor.decode(cursor) if cursor else None
    except ValueError as exc:
        return unprocessable(validation_detail(["query", "cursor"], str(exc), "value_error"))
    found = list_jobs(after=after, limit=limit, **filters)
    headers: dict[str, str] = {}
    if len(found) == limit:
        token = cursor_of(found[-1]).encode()
        url = request.url.include_query_params(cursor=token).remove_query_params("offset")
        headers = {"X-Next-Cursor": token, "Link": f'<{url.path}?{url.query}>; rel="next"'}
    body = [readable(summary(record.as_dict())) for record in found]
    return SafeJSONResponse(body, headers=headers)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    summary = {k: v for k, v in record.items() if k not in SUMMARY_OMITS}
    message = summary.get("error_message")
    if isinstance(message, str) and len(message) > SUMMARY_ERROR_CHARS:
        summary["error_message"] = message[:SUMMARY_ERROR_CHARS] + "…"
    return summary

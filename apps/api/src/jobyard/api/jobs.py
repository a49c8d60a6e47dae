"""Routes of jobs and dead letters: dispatch, list, inspect, replay, cancel.

Routes that call blocking code (Redis, the database, the Temporal client's own loop) are plain
`def`, which FastAPI runs in its thread pool, so a slow engine never stalls the event loop.
The order of the routes on `/jobs/{job_id:path}` matters: a job id may hold slashes, so the
longer paths (`/timeline`) come before the bare one; app.py includes the events router first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import JSONResponse

from jobyard.api.auth import ADMIN, TOKEN, Role, require_token
from jobyard.api.params import (
    DISPATCH_BODY_DOC,
    JOB_ID_PATH,
    MAX_OFFSET,
    MAX_PAGE,
    NAME_PATTERN,
    Engine,
    JobIdPath,
    JobState,
    Since,
    Until,
)
from jobyard.api.responses import (
    ADMIN_RESPONSES,
    LISTING_RESPONSES,
    RETRY_AFTER_SECONDS,
    TOKEN_RESPONSES,
    WRITE_RESPONSES,
    SafeJSONResponse,
    accepted,
    doc,
    unavailable,
    unprocessable,
    validation_detail,
)
from jobyard.api.views import job_log_view, listing, merge, readable
from jobyard.dispatcher import (
    DispatchOutcomeUnknownError,
    DispatchUnavailableError,
    JobNotFoundError,
    adispatch_job,
    cancel_job,
    get_job,
    get_job_record,
    get_job_steps,
    replay_job,
)
from jobyard.dispatcher.dispatch import MAX_DELAY_SECONDS
from jobyard.dispatcher.relations import (
    MAX_LISTED,
    journal_of,
    related_jobs,
    started_children,
    upstream_of,
)
from jobyard.dispatcher.submission import check_after
from jobyard.dispatcher.timeline import job_timeline
from jobyard.job_engine import UnsafeURLError, get_spec, netguard, strictjson
from jobyard.job_engine.context import UPSTREAM_STEP
from jobyard.job_engine.flow import PRIORITY_MAX, PRIORITY_MIN

log = logging.getLogger("jobyard.api")
router = APIRouter()


@router.post(
    "/jobs/{name}",
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=DISPATCH_BODY_DOC,
    dependencies=TOKEN,
    tags=["jobs"],
    responses={
        **ADMIN_RESPONSES,
        **WRITE_RESPONSES,
        403: doc("the job cannot be started over HTTP, or a cross-origin request"),
        404: doc("unknown job"),
        409: doc("the job id is taken by another job name or another payload"),
        413: doc("request body or payload too large"),
        504: doc(
            "the outcome is unknown: an engine stopped answering mid-request; dispatching "
            "again with the same job_id is safe"
        ),
        422: doc("invalid payload or query parameter"),
    },
)
async def dispatch(
    name: str,
    request: Request,
    job_id: str | None = Query(
        None,
        pattern=JOB_ID_PATH,
        description="Idempotency key: a second dispatch with this id and the same job and "
        "payload starts nothing; with another job or payload it is a 409.",
    ),
    delay: float | None = Query(
        None, ge=0, le=MAX_DELAY_SECONDS, description="Seconds before the job may start."
    ),
    webhook_url: str | None = Query(
        None,
        max_length=2000,
        description="http(s) URL that receives the job's final state, signed. Private, "
        "loopback and link-local addresses are refused unless in JOBYARD_WEBHOOK_ALLOW.",
    ),
    priority: int | None = Query(
        None,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="Among the queue's waiting jobs, higher starts first (-100 to 100); "
        "default: the job's own.",
    ),
    after: Annotated[
        list[str] | None,
        Query(
            description="Job ids (repeat the parameter) that must all have ended before this "
            "job starts; each must exist (422 otherwise)."
        ),
    ] = None,
    after_failure: Literal["cancel", "run"] = Query(
        "cancel",
        description="When one `after` job did not succeed: `cancel` this job (it ends "
        "cancelled, naming it) or `run` it anyway.",
    ),
) -> JSONResponse:
    """Start job `name` with the JSON body as its payload."""
    spec = await asyncio.to_thread(get_spec, name)
    if not spec.http:
        return SafeJSONResponse(
            {"detail": f"job {name!r} cannot be started over HTTP"},
            status.HTTP_403_FORBIDDEN,
        )
    if webhook_url is not None:
        try:
            netguard.check_url(webhook_url)
        except UnsafeURLError as exc:
            return unprocessable(
                validation_detail(["query", "webhook_url"], exc.reason, "url_parsing")
            )
    try:
        check_after(after, after_failure)
    except ValueError as exc:
        return unprocessable(validation_detail(["query", "after"], str(exc), "after"))
    raw = await request.body()
    try:
        payload = strictjson.loads(raw)
    except strictjson.StrictJSONError as exc:  # also an empty body and invalid UTF-8
        return unprocessable(
            validation_detail(["body"], f"the body must be JSON: {exc}", "json_invalid")
        )
    try:
        handle = await adispatch_job(
            name, payload, job_id=job_id, delay=delay, webhook_url=webhook_url, priority=priority,
            after=after, after_failure=after_failure,
        )  # fmt: skip
    except DispatchUnavailableError as exc:
        log.warning("dispatch of %s unavailable: %s", job_id, exc)
        which = f"job {job_id!r}" if job_id else "the job"
        return unavailable(f"no engine could take {which}; nothing was started; retry later")
    except DispatchOutcomeUnknownError as exc:
        log.warning("dispatch of %s: outcome unknown: %s", exc.job_id, exc)
        return SafeJSONResponse(
            {
                "detail": "an engine stopped answering mid-request: the job may have "
                "started. Dispatch again with this job_id: it is safe.",
                "job_id": exc.job_id,
                "outcome": "unknown",
            },
            status.HTTP_504_GATEWAY_TIMEOUT,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return accepted(request, handle)


@router.get("/jobs", tags=["jobs"], dependencies=TOKEN, responses=LISTING_RESPONSES)
def jobs(
    request: Request,
    state: JobState | None = None,
    name: str | None = Query(None, pattern=NAME_PATTERN),
    queue: str | None = Query(None, pattern=NAME_PATTERN),
    engine: Engine | None = None,
    since: Since = None,
    until: Until = None,
    job_id: str | None = Query(
        None, max_length=200, description="Search: this job id, or ids starting with it."
    ),
    cursor: str | None = Query(
        None, max_length=600, description="The X-Next-Cursor of the previous page."
    ),
    limit: int = Query(50, ge=1, le=MAX_PAGE),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> JSONResponse:
    """The job log, most recently enqueued first: summaries, without payloads, results or
    progress (GET /jobs/{job_id} has those). The next page: `?cursor=` the X-Next-Cursor
    header (also in Link: rel="next"), absent on the last page."""
    return listing(
        request, limit, cursor, state=state, name=name, queue=queue, engine=engine,
        since=since, until=until, job_id=job_id, offset=offset,
    )  # fmt: skip


@router.get("/dead", tags=["jobs"], dependencies=TOKEN, responses=LISTING_RESPONSES)
def dead(
    request: Request,
    name: str | None = Query(None, pattern=NAME_PATTERN),
    queue: str | None = Query(None, pattern=NAME_PATTERN),
    engine: Engine | None = None,
    since: Since = None,
    until: Until = None,
    job_id: str | None = Query(None, max_length=200),
    cursor: str | None = Query(None, max_length=600),
    limit: int = Query(50, ge=1, le=MAX_PAGE),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> JSONResponse:
    """Dead letters: jobs that exhausted their retries (summaries and pages as GET /jobs)."""
    return listing(
        request, limit, cursor, state=JobState.DEAD, name=name, queue=queue, engine=engine,
        since=since, until=until, job_id=job_id, offset=offset,
    )  # fmt: skip


@router.post(
    "/jobs/{job_id:path}/replay",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=ADMIN,
    tags=["admin"],
    responses={
        **ADMIN_RESPONSES,
        **WRITE_RESPONSES,
        404: doc("no such job"),
        409: doc("the job is still queued or running"),
    },
)
def replay(job_id: JobIdPath, request: Request) -> JSONResponse:
    """Run a dead, failed or cancelled job again, keeping the steps it finished."""
    return accepted(request, replay_job(job_id))


@router.get(
    "/jobs/{job_id:path}/timeline",
    tags=["jobs"],
    dependencies=TOKEN,
    responses={**TOKEN_RESPONSES, 404: doc("no such job")},
)
def timeline(job_id: JobIdPath) -> list[dict[str, Any]]:
    """The job's steps (start, duration, attempts, engine) and durable sleeps, oldest first,
    on every engine that ran part of it. A step that started children lists their ids
    (`children`, at most MAX_LISTED); the wait for the jobs it was dispatched after, theirs
    (`upstream`)."""
    steps = get_job_steps(job_id)
    entries = job_timeline(job_id, steps)
    if not entries and get_job_record(job_id) is None:
        get_job(job_id)  # JobNotFoundError: 404 for a job no one knows
    if not entries:
        return entries
    journal = journal_of(job_id)
    children = started_children(job_id, steps or journal)
    upstream = upstream_of(journal)
    for entry in entries:
        if entry["name"] in children:
            entry["children"] = children[entry["name"]][:MAX_LISTED]
        elif entry["name"] == UPSTREAM_STEP and upstream:
            entry["upstream"] = upstream
    return entries


@router.get(
    "/jobs/{job_id:path}",
    tags=["jobs"],
    dependencies=TOKEN,
    responses={**TOKEN_RESPONSES, 404: doc("no such job")},
)
def job_detail(job_id: JobIdPath, role: Annotated[Role, Depends(require_token)]) -> dict[str, Any]:
    """The engine's live status merged with the job log: payload, result, timestamps, error
    and steps (the error's traceback for admin tokens only: it shows server paths), the children it
    started and the jobs it was dispatched after (`children`, `children_count`, `upstream`)."""
    try:
        live = get_job(job_id).as_dict()
    except JobNotFoundError:
        live = None  # an old job whose engine record expired may still be in the log
    record, steps, log_error = job_log_view(job_id)
    if live is None and record is None:
        raise JobNotFoundError(job_id)
    detail = readable(merge(live, record))
    detail["steps"] = steps
    if log_error is None:
        detail |= related_jobs(job_id, steps or {})
    if role != "admin":
        detail.pop("error_traceback", None)
    if log_error is not None:
        detail["job_log_error"] = log_error
    return detail


@router.delete(
    "/jobs/{job_id:path}",
    dependencies=ADMIN,
    tags=["admin"],
    responses={**ADMIN_RESPONSES, **WRITE_RESPONSES, 404: doc("no such job")},
)
def cancel(job_id: JobIdPath) -> dict[str, Any]:
    """Cancel: a queued job never starts; a running one stops at its next step."""
    return cancel_job(job_id).as_dict()

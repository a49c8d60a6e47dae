"""The HTTP API: dispatch, inspect and steer jobs on either engine, plus the dashboard.

Every route is a thin translation of a `jobyard.dispatcher` call; the mapping of jobyard's
errors to HTTP statuses lives in one place (`_install_error_handlers`). Routes that call
blocking code (Redis, the database, the Temporal client's own loop) are plain `def`, which
FastAPI runs in its thread pool, so a slow engine never stalls the event loop.

Closed by default (see auth.py and guard.py): every route but GET /health needs a bearer token,
admin routes an admin token; jobs declared `http=False` cannot be started here at all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import cache
from importlib.resources import files
from typing import Annotated, Any, Literal
from urllib.parse import quote

import redis
from fastapi import Depends, FastAPI, Path, Query, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import exc as sa_exc

from jobyard.api.auth import Role, require_admin, require_token
from jobyard.api.guard import GuardMiddleware
from jobyard.api.health import TemporalProbe, redis_ok
from jobyard.api.schedules import router as schedules_router
from jobyard.dispatcher import (
    DispatchOutcomeUnknownError,
    DispatchUnavailableError,
    EngineUnavailable,
    JobHandle,
    JobNotFoundError,
    JobStillActiveError,
    adispatch_job,
    cancel_job,
    get_job,
    get_job_record,
    get_job_steps,
    list_jobs,
    list_workers,
    queue_stats,
    replay_job,
    warm_up,
)
from jobyard.dispatcher.dispatch import JOB_ID_PATTERN, MAX_DELAY_SECONDS
from jobyard.dispatcher.events import ajob_events, stream_position
from jobyard.dispatcher.lifecycle import Cursor, cursor_of
from jobyard.dispatcher.stats import queue_history
from jobyard.dispatcher.timeline import job_timeline, without_timings
from jobyard.job_engine import (
    IdempotencyConflictError,
    InvalidPayloadError,
    MissingSettingError,
    PayloadTooLargeError,
    UnknownJobError,
    UnsafeURLError,
    get_spec,
    netguard,
    strictjson,
)

log = logging.getLogger("jobyard.api")

#: Seconds a client should wait before retrying when no engine could take a job. The
#: dispatcher's Redis probe runs every fraction of a second and a Temporal start times out in
#: ~2 s, so a few seconds is long enough for either to have changed its mind.
RETRY_AFTER_SECONDS = 5
MAX_PAGE = 500
#: Dead jobs one POST /dead/replay runs again (each is a call to its engine).
MAX_BULK_REPLAY = 500
#: Deepest offset a listing pages to; past it the database would scan (or overflow) for nothing.
MAX_OFFSET = 1_000_000
JobState = Literal["queued", "running", "retrying", "succeeded", "failed", "dead", "cancelled"]
Engine = Literal["dramatiq", "temporal"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}$"  # job and queue names
JOB_ID_PATH = f"^{JOB_ID_PATTERN.pattern}$"
#: Listings carry summaries: what a table row shows. Payloads, results and tracebacks can be
#: large and private; GET /jobs/{id} has them.
SUMMARY_OMITS = ("payload", "result", "progress", "error_traceback")
SUMMARY_ERROR_CHARS = 300
#: How a job waiting on a timer (run_at in the future) reads: see _readable.
WAITING_STATES = {"running": "sleeping", "queued": "delayed", "retrying": "retrying"}
FINAL_STATES = ("succeeded", "failed", "cancelled", "dead")
#: How soon an EventSource reconnects after a dropped stream, and how often a quiet one pings.
SSE_RETRY_MS = 1000
KEEPALIVE_SECONDS = 15.0

DISPATCH_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "The job's payload, validated against the job's schema (strict JSON).",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}


def _doc(description: str) -> dict[str, Any]:
    return {"description": description}


TOKEN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _doc("missing or wrong bearer token (or none configured on the server)"),
    503: _doc("a service this route needs (Redis, the job log database, Temporal) is down"),
}
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **TOKEN_RESPONSES,
    403: _doc("an API token on an admin route, or a cross-origin request"),
}
LISTING_RESPONSES: dict[int | str, dict[str, Any]] = {
    **TOKEN_RESPONSES,
    200: {
        "description": "a page of job summaries",
        "headers": {
            "X-Next-Cursor": {
                "description": "pass as ?cursor= for the next page; absent on the last page",
                "schema": {"type": "string"},
            }
        },
    },
    422: _doc("invalid filter or cursor"),
}
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: _doc("request body too large"),
    415: _doc("the body is not application/json"),
}


class SafeJSONResponse(JSONResponse):
    """JSON that always renders: a stored value no encoder can write (a lone surrogate, NaN
    from an older job) must never turn a listing into a 500 for everyone."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(
                content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
            ).encode("ascii")
        except (TypeError, ValueError, RecursionError):
            return json.dumps(
                _printable(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")
            ).encode("ascii")


def _printable(value: Any, depth: int = 0) -> Any:
    """`value` with what JSON cannot carry replaced: non-finite numbers by None, unknown types
    by their repr, anything nested past strictjson.MAX_DEPTH by a marker."""
    if depth > strictjson.MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, dict):
        return {str(k): _printable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def _validation_detail(loc: list[Any], msg: str, kind: str) -> list[dict[str, Any]]:
    """One error in the shape FastAPI uses for its own 422s, so clients parse one format."""
    return [{"type": kind, "loc": loc, "msg": msg}]


def _unprocessable(detail: list[dict[str, Any]]) -> JSONResponse:
    return SafeJSONResponse(
        {"detail": jsonable_encoder(detail)}, status.HTTP_422_UNPROCESSABLE_CONTENT
    )


def _unavailable(detail: str) -> JSONResponse:
    return SafeJSONResponse(
        {"detail": detail},
        status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _status_url(request: Request, job_id: str) -> str:
    # root_path keeps the link right when web code mounts this app under a prefix.
    return f"{request.scope.get('root_path', '')}/jobs/{quote(job_id, safe='')}"


def _accepted(request: Request, handle: JobHandle) -> JSONResponse:
    url = _status_url(request, handle.job_id)
    body = {
        "job_id": handle.job_id,
        "engine": handle.engine,
        "status_url": url,
        "fallback_reason": handle.fallback_reason,
        "duplicate": handle.duplicate,
    }
    return SafeJSONResponse(body, status.HTTP_202_ACCEPTED, headers={"Location": url})


def _install_error_handlers(app: FastAPI) -> None:
    def not_found(_: Request, exc: Exception) -> JSONResponse:
        return SafeJSONResponse({"detail": str(exc)}, status.HTTP_404_NOT_FOUND)

    def invalid_payload(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidPayloadError)
        if exc.errors:  # pydantic's errors; loc is made absolute like FastAPI's ("body", ...)
            detail = [{**e, "loc": ["body", *e.get("loc", ())]} for e in exc.errors]
        else:  # not JSON-serialisable and similar: no per-field errors, only a reason
            detail = _validation_detail(["body"], exc.reason, "invalid_payload")
        return _unprocessable(detail)

    def too_large(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, PayloadTooLargeError)
        return SafeJSONResponse(
            {"detail": str(exc), "size": exc.size, "limit": exc.limit},
            status.HTTP_413_CONTENT_TOO_LARGE,
        )

    def conflict(_: Request, exc: Exception) -> JSONResponse:
        return SafeJSONResponse({"detail": str(exc)}, status.HTTP_409_CONFLICT)

    def unsafe_url(_: Request, exc: Exception) -> JSONResponse:
        return _unprocessable(_validation_detail(["query", "webhook_url"], str(exc), "url_unsafe"))

    def missing_setting(_: Request, exc: Exception) -> JSONResponse:
        # 503, not 422: the request is fine, this server lacks a setting; only its operator
        # can fix that, and the same request will succeed afterwards.
        assert isinstance(exc, MissingSettingError)
        return SafeJSONResponse(
            {"detail": str(exc), "missing_settings": exc.missing},
            status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    # Outages: the status and a retry hint, never the library's message (it names internal
    # hosts and ports) and never a traceback; the log has the details.
    def engine_unavailable(_: Request, exc: Exception) -> JSONResponse:
        engine = getattr(exc, "engine", None)
        log.warning("engine unavailable: %s", exc)
        return _unavailable(f"{engine or 'an engine'} is unavailable; retry later")

    def dispatch_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("dispatch unavailable: %s", exc)
        return _unavailable("no engine could take the job; nothing was started; retry later")

    def database_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("job log database unavailable: %s", exc)
        return _unavailable("the job log database is unavailable; retry later")

    def redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        return _unavailable("Redis is unavailable; retry later")

    def still_active(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, JobStillActiveError)
        return SafeJSONResponse({"detail": str(exc), "state": exc.state}, status.HTTP_409_CONFLICT)

    app.add_exception_handler(UnknownJobError, not_found)
    app.add_exception_handler(JobNotFoundError, not_found)
    app.add_exception_handler(InvalidPayloadError, invalid_payload)
    app.add_exception_handler(PayloadTooLargeError, too_large)
    app.add_exception_handler(IdempotencyConflictError, conflict)
    app.add_exception_handler(UnsafeURLError, unsafe_url)
    app.add_exception_handler(MissingSettingError, missing_setting)
    app.add_exception_handler(DispatchUnavailableError, dispatch_unavailable)
    app.add_exception_handler(EngineUnavailable, engine_unavailable)
    app.add_exception_handler(JobStillActiveError, still_active)
    app.add_exception_handler(sa_exc.OperationalError, database_down)
    app.add_exception_handler(sa_exc.InterfaceError, database_down)
    app.add_exception_handler(sa_exc.TimeoutError, database_down)  # the connection pool's
    app.add_exception_handler(redis.RedisError, redis_down)
    _install_temporal_handler(app)


def _install_temporal_handler(app: FastAPI) -> None:
    from temporalio.service import RPCError

    def temporal_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Temporal unavailable: %s", exc)
        return _unavailable("Temporal is unavailable; retry later")

    app.add_exception_handler(RPCError, temporal_down)


def _job_log_view(job_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
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


def _merge(status_: dict[str, Any] | None, record: dict[str, Any] | None) -> dict[str, Any]:
    """The record's history overlaid with the engine's live answer (state, attempts, result,
    progress), except where the engine has nothing to say."""
    merged = dict(record or {})
    for key, value in (status_ or {}).items():
        if value is not None or key not in merged:
            merged[key] = value
    return merged


def _readable(job: dict[str, Any]) -> dict[str, Any]:
    """Adds `display_state`, the state as a person reads it: a running job waiting on its
    durable sleep is "sleeping", a queued job waiting for its dispatch delay (or rate limit) is
    "delayed", until `run_at` (an ISO time; for a retrying job, its next attempt)."""
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
    if not waiting and state in ("queued", "running"):
        job["run_at"] = None  # past: the job is not waiting on it any more
    job["display_state"] = WAITING_STATES.get(state or "", state) if waiting else state
    return job


class BulkReplay(BaseModel):
    """Which dead jobs POST /dead/replay runs again."""

    model_config = ConfigDict(extra="forbid")

    job_ids: list[Annotated[str, StringConstraints(pattern=JOB_ID_PATH)]] = Field(
        default_factory=list, max_length=MAX_BULK_REPLAY
    )
    all: bool = False
    name: str | None = Field(None, pattern=NAME_PATTERN)
    queue: str | None = Field(None, pattern=NAME_PATTERN)
    engine: Engine | None = None
    since: datetime | None = None
    until: datetime | None = None


def _listing(request: Request, limit: int, cursor: str | None, **filters: Any) -> JSONResponse:
    """A page of summaries; the cursor of the next page in X-Next-Cursor and Link."""
    try:
        after = Cursor.decode(cursor) if cursor else None
    except ValueError as exc:
        return _unprocessable(_validation_detail(["query", "cursor"], str(exc), "value_error"))
    found = list_jobs(after=after, limit=limit, **filters)
    headers: dict[str, str] = {}
    if len(found) == limit:
        token = cursor_of(found[-1]).encode()
        url = request.url.include_query_params(cursor=token).remove_query_params("offset")
        headers = {"X-Next-Cursor": token, "Link": f'<{url.path}?{url.query}>; rel="next"'}
    body = [_readable(_summary(record.as_dict())) for record in found]
    return SafeJSONResponse(body, headers=headers)


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    summary = {k: v for k, v in record.items() if k not in SUMMARY_OMITS}
    message = summary.get("error_message")
    if isinstance(message, str) and len(message) > SUMMARY_ERROR_CHARS:
        summary["error_message"] = message[:SUMMARY_ERROR_CHARS] + "…"
    return summary


def _last_event_id(header: str | None, after: int | None) -> int:
    """Where a stream resumes: the Last-Event-ID header (what EventSource sends) or ?after=."""
    if header is not None and header.strip().isdigit():
        return int(header.strip())
    return after or 0


async def _sse(job_id: str, after: int, request: Request) -> AsyncIterator[str]:
    """The SSE text of a job's events; a comment line every KEEPALIVE_SECONDS keeps proxies
    from closing a quiet stream."""
    yield f"retry: {SSE_RETRY_MS}\n\n"
    events = ajob_events(job_id, after)
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[Any] | None = None
    quiet_since = loop.time()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=1.0)  # then check the client
            if await request.is_disconnected():
                return
            if not done:
                if loop.time() - quiet_since >= KEEPALIVE_SECONDS:
                    quiet_since = loop.time()
                    yield ": keep-alive\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            quiet_since = loop.time()
            data = json.dumps(_printable(event.as_dict()), ensure_ascii=True, allow_nan=False)
            yield f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n"
    finally:
        if pending is not None:  # the client left mid-read: let that read finish cancelling
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await events.aclose()


@cache
def _dashboard_html() -> str:
    return files("jobyard.api").joinpath("dashboard.html").read_text(encoding="utf-8")


@cache
def _dashboard_csp() -> str:
    """Only the page's own inline script and style (by hash) and calls to this origin."""
    html = _dashboard_html()

    def hashes(tag: str) -> str:
        # the elements themselves, each opening a line (not a mention inside a comment)
        blocks = re.findall(rf"^<{tag}>(.*?)</{tag}>", html, flags=re.S | re.M)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
            for b in blocks
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    )


def _render_metrics() -> tuple[bytes, str]:
    """The dispatcher's exposition when it provides one (it merges the worker processes'
    multiprocess metrics), else this process's default registry."""
    try:
        module = importlib.import_module("jobyard.dispatcher.metrics")
    except ModuleNotFoundError as exc:
        if exc.name != "jobyard.dispatcher.metrics":
            raise  # the module exists but one of its imports is missing: a real error
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(), CONTENT_TYPE_LATEST
    rendered: tuple[bytes, str] = module.render()
    return rendered


Since = Annotated[datetime | None, Query(description="Enqueued at or after (ISO 8601).")]
Until = Annotated[datetime | None, Query(description="Enqueued before (ISO 8601).")]
JobIdPath = Annotated[
    str,
    Path(
        pattern=JOB_ID_PATH,
        description="A job id (1-200 characters of letters, digits and ._:@/-, starting with a "
        "letter or digit).",
    ),
]


def create_app(*, warm: bool = True) -> FastAPI:
    """The jobyard API as an ASGI app; web code may serve it or `mount("/jobyard", app)`.

    With `warm`, start-up imports the job modules and connects to Temporal (`warm_up()`), so
    the first request does not pay for it. A mounted app gets no start-up event; it warms up
    lazily on its first dispatch instead.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if warm:
            await asyncio.to_thread(warm_up)
        yield

    app = FastAPI(
        title="jobyard",
        summary="Dispatch, inspect and steer background jobs on Dramatiq and Temporal.",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
        # The schema is served below behind a token; the docs pages load scripts from a CDN,
        # which neither the CSP nor machines without internet allow.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(GuardMiddleware)
    _install_error_handlers(app)
    app.include_router(schedules_router)  # admin-only (require_admin on the router)
    temporal_probe = TemporalProbe()
    token = [Depends(require_token)]
    admin = [Depends(require_admin)]

    @app.post(
        "/jobs/{name}",
        status_code=status.HTTP_202_ACCEPTED,
        openapi_extra=DISPATCH_BODY_DOC,
        dependencies=token,
        tags=["jobs"],
        responses={
            **ADMIN_RESPONSES,
            **WRITE_RESPONSES,
            403: _doc("the job cannot be started over HTTP, or a cross-origin request"),
            404: _doc("unknown job"),
            409: _doc("the job id is taken by another job name or another payload"),
            413: _doc("request body or payload too large"),
            504: _doc(
                "the outcome is unknown: an engine stopped answering mid-request; dispatching "
                "again with the same job_id is safe"
            ),
            422: _doc("invalid payload or query parameter"),
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
                return _unprocessable(
                    _validation_detail(["query", "webhook_url"], exc.reason, "url_parsing")
                )
        raw = await request.body()
        try:
            payload = strictjson.loads(raw)
        except strictjson.StrictJSONError as exc:  # also an empty body and invalid UTF-8
            return _unprocessable(
                _validation_detail(["body"], f"the body must be JSON: {exc}", "json_invalid")
            )
        try:
            handle = await adispatch_job(
                name, payload, job_id=job_id, delay=delay, webhook_url=webhook_url
            )
        except DispatchUnavailableError as exc:
            log.warning("dispatch of %s unavailable: %s", job_id, exc)
            which = f"job {job_id!r}" if job_id else "the job"
            return _unavailable(f"no engine could take {which}; nothing was started; retry later")
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
        return _accepted(request, handle)

    @app.get("/jobs", tags=["jobs"], dependencies=token, responses=LISTING_RESPONSES)
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
        return _listing(
            request, limit, cursor, state=state, name=name, queue=queue, engine=engine,
            since=since, until=until, job_id=job_id, offset=offset,
        )  # fmt: skip

    @app.get("/dead", tags=["jobs"], dependencies=token, responses=LISTING_RESPONSES)
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
        return _listing(
            request, limit, cursor, state="dead", name=name, queue=queue, engine=engine,
            since=since, until=until, job_id=job_id, offset=offset,
        )  # fmt: skip

    @app.post(
        "/dead/replay",
        dependencies=admin,
        tags=["admin"],
        responses={
            **ADMIN_RESPONSES,
            **WRITE_RESPONSES,
            400: _doc("the body is not valid JSON"),
            422: _doc("neither ids nor a filter, or an invalid one"),
        },
    )
    def replay_dead(body: BulkReplay) -> JSONResponse:
        """Replay several dead jobs: the listed `job_ids`, or (`all: true`) every dead job that
        matches the filter, up to MAX_BULK_REPLAY per call (`more` says whether some are left).
        Each id's outcome: "replayed" with its engine, or why not."""
        if body.job_ids:
            ids = body.job_ids
        elif body.all:
            found = list_jobs(
                state="dead", name=body.name, queue=body.queue, engine=body.engine,
                since=body.since, until=body.until, limit=MAX_BULK_REPLAY,
            )  # fmt: skip
            ids = [record.job_id for record in found]
        else:
            return _unprocessable(
                _validation_detail(["body"], "give job_ids, or all: true", "missing")
            )
        outcomes: dict[str, dict[str, Any]] = {}
        for job_id in ids:
            try:
                handle = replay_job(job_id)
                outcomes[job_id] = {"outcome": "replayed", "engine": handle.engine}
            except JobStillActiveError as exc:
                outcomes[job_id] = {"outcome": "active", "state": exc.state}
            except JobNotFoundError:
                outcomes[job_id] = {"outcome": "not_found"}
        replayed = sum(o["outcome"] == "replayed" for o in outcomes.values())
        more = bool(body.all and len(ids) == MAX_BULK_REPLAY)
        return SafeJSONResponse({"replayed": replayed, "jobs": outcomes, "more": more})

    @app.get("/stats/queues", tags=["jobs"], dependencies=token, responses=TOKEN_RESPONSES)
    def stats_queues(
        window: int = Query(3600, ge=60, le=30 * 24 * 3600, description="Seconds back."),
        buckets: int = Query(30, ge=1, le=240),
    ) -> dict[str, Any]:
        """Per-queue history from the job log, in `buckets` slices of the last `window`
        seconds: jobs finished and failed, run time and queue wait (p50, p95)."""
        return queue_history(window, buckets)

    @app.post(
        "/jobs/{job_id:path}/replay",
        status_code=status.HTTP_202_ACCEPTED,
        dependencies=admin,
        tags=["admin"],
        responses={
            **ADMIN_RESPONSES,
            **WRITE_RESPONSES,
            404: _doc("no such job"),
            409: _doc("the job is still queued or running"),
        },
    )
    def replay(job_id: JobIdPath, request: Request) -> JSONResponse:
        """Run a dead, failed or cancelled job again, keeping the steps it finished."""
        return _accepted(request, replay_job(job_id))

    @app.get(
        "/jobs/{job_id:path}/events",
        tags=["jobs"],
        dependencies=token,
        response_class=StreamingResponse,
        responses={
            **TOKEN_RESPONSES,
            200: {"description": "Server-Sent Events", "content": {"text/event-stream": {}}},
            204: _doc("the job is finished and the client has seen its last event"),
            404: _doc("no such job"),
        },
    )
    async def job_events_stream(
        job_id: JobIdPath,
        request: Request,
        after: int | None = Query(
            None, ge=0, description="Resume after this event id (as the Last-Event-ID header)."
        ),
    ) -> Response:
        """The job's state changes and progress reports as Server-Sent Events, on either engine,
        ending with its final state. Each event's `id` is its number in the job's sequence;
        reconnecting with `Last-Event-ID` (or `?after=`) resumes after it, nothing lost or
        repeated."""
        resume = _last_event_id(request.headers.get("last-event-id"), after)
        position = await asyncio.to_thread(stream_position, job_id)
        if position is None:
            await asyncio.to_thread(get_job, job_id)  # JobNotFoundError: 404
        elif position[1] in FINAL_STATES and resume >= position[0]:
            return Response(status_code=status.HTTP_204_NO_CONTENT)  # stops EventSource
        return StreamingResponse(
            _sse(job_id, resume, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/jobs/{job_id:path}/timeline",
        tags=["jobs"],
        dependencies=token,
        responses={**TOKEN_RESPONSES, 404: _doc("no such job")},
    )
    def timeline(job_id: JobIdPath) -> list[dict[str, Any]]:
        """The job's steps (start, duration, attempts, engine) and durable sleeps, oldest first,
        on every engine that ran part of it."""
        steps = get_job_steps(job_id)
        entries = job_timeline(job_id, steps)
        if not entries and get_job_record(job_id) is None:
            get_job(job_id)  # JobNotFoundError: 404 for a job no one knows
        return entries

    @app.get(
        "/jobs/{job_id:path}",
        tags=["jobs"],
        dependencies=token,
        responses={**TOKEN_RESPONSES, 404: _doc("no such job")},
    )
    def job_detail(
        job_id: JobIdPath, role: Annotated[Role, Depends(require_token)]
    ) -> dict[str, Any]:
        """The engine's live status merged with the job log: payload, result, timestamps, error
        and steps (the error's traceback for admin tokens only: it shows server paths)."""
        try:
            live = get_job(job_id).as_dict()
        except JobNotFoundError:
            live = None  # an old job whose engine record expired may still be in the log
        record, steps, log_error = _job_log_view(job_id)
        if live is None and record is None:
            raise JobNotFoundError(job_id)
        detail = _readable(_merge(live, record))
        detail["steps"] = steps
        if role != "admin":
            detail.pop("error_traceback", None)
        if log_error is not None:
            detail["job_log_error"] = log_error
        return detail

    @app.delete(
        "/jobs/{job_id:path}",
        dependencies=admin,
        tags=["admin"],
        responses={**ADMIN_RESPONSES, **WRITE_RESPONSES, 404: _doc("no such job")},
    )
    def cancel(job_id: JobIdPath) -> dict[str, Any]:
        """Cancel: a queued job never starts; a running one stops at its next step."""
        return cancel_job(job_id).as_dict()

    @app.get("/queues", dependencies=admin, tags=["admin"], responses={**ADMIN_RESPONSES})
    def queues() -> list[dict[str, Any]]:
        return [stats.as_dict() for stats in queue_stats()]

    @app.get("/workers", dependencies=admin, tags=["admin"], responses={**ADMIN_RESPONSES})
    def workers() -> list[dict[str, Any]]:
        return [worker.as_dict() for worker in list_workers()]

    @app.get("/health", tags=["ops"], responses={503: _doc("no engine reachable")})
    async def health() -> JSONResponse:
        """Open to everyone (load balancers): says only whether each engine answers."""
        redis_up, temporal_up = await asyncio.gather(
            asyncio.to_thread(redis_ok), temporal_probe.ok()
        )
        up = redis_up or temporal_up  # one engine is enough: dispatch falls back to the other
        return SafeJSONResponse(
            {"status": "ok" if up else "unavailable", "redis": redis_up, "temporal": temporal_up},
            status.HTTP_200_OK if up else status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        dependencies=token,
        responses={
            **TOKEN_RESPONSES,
            200: {"description": "Prometheus text", "content": {"text/plain": {}}},
        },
    )
    def metrics() -> Response:
        """Prometheus text exposition (a scraper sends a token: `authorization.credentials`)."""
        body, content_type = _render_metrics()
        return Response(body, media_type=content_type)

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        # The page holds no data; everything it shows comes from token-checked calls.
        return HTMLResponse(
            _dashboard_html(), headers={"Content-Security-Policy": _dashboard_csp()}
        )

    @app.get("/openapi.json", include_in_schema=False, dependencies=token)
    def openapi() -> JSONResponse:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
        return SafeJSONResponse(app.openapi_schema)

    return app

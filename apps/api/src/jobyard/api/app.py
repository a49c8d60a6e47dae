"""The HTTP API: dispatch, inspect and steer jobs on either engine, plus the dashboard.

Every route is a thin translation of a `jobyard.dispatcher` call; the mapping of jobyard's
errors to HTTP statuses lives in one place (`_install_error_handlers`). Routes that call
blocking code (Redis, the database, the Temporal client's own loop) are plain `def`, which
FastAPI runs in its thread pool, so a slow engine never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from importlib.resources import files
from typing import Any, Literal
from urllib.parse import quote, urlparse

from fastapi import Depends, FastAPI, Query, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, Response

from jobyard.api.auth import require_admin
from jobyard.api.health import TemporalProbe, redis_ok
from jobyard.api.schedules import router as schedules_router
from jobyard.dispatcher import (
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
from jobyard.job_engine import InvalidPayloadError, MissingSettingError, UnknownJobError

log = logging.getLogger("jobyard.api")

#: Seconds a client should wait before retrying when no engine could take a job. The
#: dispatcher's Redis probe runs every fraction of a second and a Temporal start times out in
#: ~2 s, so a few seconds is long enough for either to have changed its mind.
RETRY_AFTER_SECONDS = 5
MAX_PAGE = 500
JOB_STATES = "queued, running, retrying, succeeded, failed, dead, cancelled"
Engine = Literal["dramatiq", "temporal"]

DISPATCH_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "The job's payload, validated against the job's schema.",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}


def _validation_detail(loc: list[Any], msg: str, kind: str) -> list[dict[str, Any]]:
    """One error in the shape FastAPI uses for its own 422s, so clients parse one format."""
    return [{"type": kind, "loc": loc, "msg": msg}]


def _unprocessable(detail: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"detail": jsonable_encoder(detail)}, status.HTTP_422_UNPROCESSABLE_CONTENT)


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
    return JSONResponse(body, status.HTTP_202_ACCEPTED, headers={"Location": url})


def _install_error_handlers(app: FastAPI) -> None:
    def not_found(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_404_NOT_FOUND)

    def invalid_payload(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidPayloadError)
        if exc.errors:  # pydantic's errors; loc is made absolute like FastAPI's ("body", ...)
            detail = [{**e, "loc": ["body", *e.get("loc", ())]} for e in exc.errors]
        else:  # not JSON-serialisable and similar: no per-field errors, only a reason
            detail = _validation_detail(["body"], exc.reason, "invalid_payload")
        return _unprocessable(detail)

    def missing_setting(_: Request, exc: Exception) -> JSONResponse:
        # 503, not 422: the request is fine, this server lacks a setting; only its operator
        # can fix that, and the same request will succeed afterwards.
        assert isinstance(exc, MissingSettingError)
        return JSONResponse(
            {"detail": str(exc), "missing_settings": exc.missing},
            status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    def unavailable(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)},
            status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    def still_active(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, JobStillActiveError)
        return JSONResponse({"detail": str(exc), "state": exc.state}, status.HTTP_409_CONFLICT)

    app.add_exception_handler(UnknownJobError, not_found)
    app.add_exception_handler(JobNotFoundError, not_found)
    app.add_exception_handler(InvalidPayloadError, invalid_payload)
    app.add_exception_handler(MissingSettingError, missing_setting)
    app.add_exception_handler(DispatchUnavailableError, unavailable)
    app.add_exception_handler(EngineUnavailable, unavailable)
    app.add_exception_handler(JobStillActiveError, still_active)


def _job_log_view(job_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """The job log's record and the recorded steps, or why they could not be read.

    The engines are the authority on a job's state; the log only adds history. A database
    outage must not turn a working status lookup into a 500, so its error is reported inline.
    """
    try:
        record = get_job_record(job_id)
        steps = get_job_steps(job_id)
    except Exception as exc:
        log.warning("job log unavailable for %s", job_id, exc_info=True)
        return None, None, f"{type(exc).__name__}: {exc}"
    return (record.as_dict() if record is not None else None), steps, None


def _merge(status_: dict[str, Any] | None, record: dict[str, Any] | None) -> dict[str, Any]:
    """The record's history overlaid with the engine's live answer (state, attempts, result,
    progress), except where the engine has nothing to say."""
    merged = dict(record or {})
    for key, value in (status_ or {}).items():
        if value is not None or key not in merged:
            merged[key] = value
    return merged


@cache
def _dashboard_html() -> str:
    return files("jobyard.api").joinpath("dashboard.html").read_text(encoding="utf-8")


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
    return module.render()


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
    )
    _install_error_handlers(app)
    app.include_router(schedules_router)  # admin-only (require_admin on the router)
    temporal_probe = TemporalProbe()
    admin = [Depends(require_admin)]

    @app.post(
        "/jobs/{name}",
        status_code=status.HTTP_202_ACCEPTED,
        openapi_extra=DISPATCH_BODY_DOC,
        tags=["jobs"],
        responses={404: {"description": "unknown job"}, 422: {}, 503: {}},
    )
    async def dispatch(
        name: str,
        request: Request,
        job_id: str | None = Query(
            None,
            pattern=f"^{JOB_ID_PATTERN.pattern}$",
            description="Idempotency key: a second dispatch with this id starts nothing.",
        ),
        delay: float | None = Query(
            None, ge=0, le=MAX_DELAY_SECONDS, description="Seconds before the job may start."
        ),
        webhook_url: str | None = Query(
            None, description="http(s) URL that receives the job's final state, signed."
        ),
    ) -> JSONResponse:
        """Start job `name` with the JSON body as its payload."""
        if webhook_url is not None:
            parsed = urlparse(webhook_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                return _unprocessable(
                    _validation_detail(
                        ["query", "webhook_url"], "an http(s) URL is required", "url_parsing"
                    )
                )
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except ValueError as exc:  # includes an empty body and invalid UTF-8
            return _unprocessable(
                _validation_detail(["body"], f"the body must be JSON: {exc}", "json_invalid")
            )
        handle = await adispatch_job(
            name, payload, job_id=job_id, delay=delay, webhook_url=webhook_url
        )
        return _accepted(request, handle)

    @app.get("/jobs", tags=["jobs"])
    def jobs(
        state: str | None = Query(None, description=f"One of: {JOB_STATES}."),
        name: str | None = None,
        queue: str | None = None,
        engine: Engine | None = None,
        limit: int = Query(50, ge=1, le=MAX_PAGE),
        offset: int = Query(0, ge=0),
    ) -> list[dict[str, Any]]:
        """The job log, most recently enqueued first."""
        found = list_jobs(
            state=state, name=name, queue=queue, engine=engine, limit=limit, offset=offset
        )
        return [record.as_dict() for record in found]

    @app.get("/dead", tags=["jobs"])
    def dead(
        name: str | None = None,
        queue: str | None = None,
        limit: int = Query(50, ge=1, le=MAX_PAGE),
        offset: int = Query(0, ge=0),
    ) -> list[dict[str, Any]]:
        """Dead letters: jobs that exhausted their retries."""
        found = list_jobs(state="dead", name=name, queue=queue, limit=limit, offset=offset)
        return [record.as_dict() for record in found]

    @app.post(
        "/jobs/{job_id:path}/replay",
        status_code=status.HTTP_202_ACCEPTED,
        dependencies=admin,
        tags=["admin"],
        responses={404: {}, 409: {"description": "the job is still queued or running"}},
    )
    def replay(job_id: str, request: Request) -> JSONResponse:
        """Run a dead, failed or cancelled job again, keeping the steps it finished."""
        return _accepted(request, replay_job(job_id))

    @app.get("/jobs/{job_id:path}", tags=["jobs"], responses={404: {}})
    def job_detail(job_id: str) -> dict[str, Any]:
        """The engine's live status merged with the job log: payload, timestamps, error, steps."""
        try:
            live = get_job(job_id).as_dict()
        except JobNotFoundError:
            live = None  # an old job whose engine record expired may still be in the log
        record, steps, log_error = _job_log_view(job_id)
        if live is None and record is None:
            raise JobNotFoundError(job_id)
        detail = _merge(live, record)
        detail["steps"] = steps
        if log_error is not None:
            detail["job_log_error"] = log_error
        return detail

    @app.delete("/jobs/{job_id:path}", dependencies=admin, tags=["admin"], responses={404: {}})
    def cancel(job_id: str) -> dict[str, Any]:
        """Cancel: a queued job never starts; a running one stops at its next step."""
        return cancel_job(job_id).as_dict()

    @app.get("/queues", dependencies=admin, tags=["admin"])
    def queues() -> list[dict[str, Any]]:
        return [stats.as_dict() for stats in queue_stats()]

    @app.get("/workers", dependencies=admin, tags=["admin"])
    def workers() -> list[dict[str, Any]]:
        return [worker.as_dict() for worker in list_workers()]

    @app.get("/health", tags=["ops"], responses={503: {"description": "no engine reachable"}})
    async def health() -> JSONResponse:
        redis_up, temporal_up = await asyncio.gather(
            asyncio.to_thread(redis_ok), temporal_probe.ok()
        )
        up = redis_up or temporal_up  # one engine is enough: dispatch falls back to the other
        return JSONResponse(
            {"status": "ok" if up else "unavailable", "redis": redis_up, "temporal": temporal_up},
            status.HTTP_200_OK if up else status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text exposition."""
        body, content_type = _render_metrics()
        return Response(body, media_type=content_type)

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(_dashboard_html())

    return app

"""The error map: which HTTP status each of jobyard's errors (and each outage of Redis, the job
log database or Temporal) answers with, in one place."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from jobyard.api.responses import SafeJSONResponse, unavailable, unprocessable, validation_detail
from jobyard.dispatcher import (
    DispatchUnavailableError,
    EngineUnavailable,
    JobNotFoundError,
    JobStillActiveError,
    UnknownUpstreamError,
)
from jobyard.job_engine import (
    IdempotencyConflictError,
    InvalidPayloadError,
    MissingSettingError,
    PayloadTooLargeError,
    UnknownJobError,
    UnsafeURLError,
)
from jobyard.job_engine.flow import InvalidPriorityError

log = logging.getLogger("jobyard.api")


def install_error_handlers(app: FastAPI) -> None:
    def not_found(_: Request, exc: Exception) -> JSONResponse:
        return SafeJSONResponse({"detail": str(exc)}, status.HTTP_404_NOT_FOUND)

    def invalid_payload(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidPayloadError)
        if exc.errors:  # pydantic's errors; loc is made absolute like FastAPI's ("body", ...)
            detail = [{**e, "loc": ["body", *e.get("loc", ())]} for e in exc.errors]
        else:  # not JSON-serialisable and similar: no per-field errors, only a reason
            detail = validation_detail(["body"], exc.reason, "invalid_payload")
        return unprocessable(detail)

    def too_large(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, PayloadTooLargeError)
        return SafeJSONResponse(
            {"detail": str(exc), "size": exc.size, "limit": exc.limit},
            status.HTTP_413_CONTENT_TOO_LARGE,
        )

    def conflict(_: Request, exc: Exception) -> JSONResponse:
        return SafeJSONResponse({"detail": str(exc)}, status.HTTP_409_CONFLICT)

    def invalid_priority(_: Request, exc: Exception) -> JSONResponse:
        return unprocessable(validation_detail(["query", "priority"], str(exc), "priority"))

    def unknown_upstream(_: Request, exc: Exception) -> JSONResponse:
        return unprocessable(validation_detail(["query", "after"], str(exc), "after_unknown"))

    def unsafe_url(_: Request, exc: Exception) -> JSONResponse:
        return unprocessable(validation_detail(["query", "webhook_url"], str(exc), "url_unsafe"))

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
        return unavailable(f"{engine or 'an engine'} is unavailable; retry later")

    def dispatch_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("dispatch unavailable: %s", exc)
        return unavailable("no engine could take the job; nothing was started; retry later")

    def database_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("job log database unavailable: %s", exc)
        return unavailable("the job log database is unavailable; retry later")

    def redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        return unavailable("Redis is unavailable; retry later")

    def still_active(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, JobStillActiveError)
        return SafeJSONResponse({"detail": str(exc), "state": exc.state}, status.HTTP_409_CONFLICT)

    app.add_exception_handler(UnknownJobError, not_found)
    app.add_exception_handler(JobNotFoundError, not_found)
    app.add_exception_handler(UnknownUpstreamError, unknown_upstream)
    app.add_exception_handler(InvalidPayloadError, invalid_payload)
    app.add_exception_handler(PayloadTooLargeError, too_large)
    app.add_exception_handler(IdempotencyConflictError, conflict)
    app.add_exception_handler(UnsafeURLError, unsafe_url)
    app.add_exception_handler(InvalidPriorityError, invalid_priority)
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
        return unavailable("Temporal is unavailable; retry later")

    app.add_exception_handler(RPCError, temporal_down)

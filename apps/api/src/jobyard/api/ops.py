"""Routes for operators' tools: health (open to load balancers), Prometheus metrics, per-queue
history, and the OpenAPI schema (behind a token)."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from fastapi import APIRouter, Query, Request, status
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from jobyard.api.auth import TOKEN
from jobyard.api.health import TemporalProbe, redis_ok
from jobyard.api.responses import TOKEN_RESPONSES, SafeJSONResponse, doc
from jobyard.dispatcher.stats import queue_history

router = APIRouter()


def temporal_probe(request: Request) -> TemporalProbe:
    """The app's own probe (create_app makes one per app: it keeps a Temporal client)."""
    probe: TemporalProbe = request.app.state.temporal_probe
    return probe


def render_metrics() -> tuple[bytes, str]:
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


@router.get("/stats/queues", tags=["jobs"], dependencies=TOKEN, responses=TOKEN_RESPONSES)
def stats_queues(
    window: int = Query(3600, ge=60, le=30 * 24 * 3600, description="Seconds back."),
    buckets: int = Query(30, ge=1, le=240),
) -> dict[str, Any]:
    """Per-queue history from the job log, in `buckets` slices of the last `window`
    seconds: jobs finished and failed, run time and queue wait (p50, p95)."""
    return queue_history(window, buckets)


@router.get("/health", tags=["ops"], responses={503: doc("no engine reachable")})
async def health(request: Request) -> JSONResponse:
    """Open to everyone (load balancers): says only whether each engine answers."""
    redis_up, temporal_up = await asyncio.gather(
        asyncio.to_thread(redis_ok), temporal_probe(request).ok()
    )
    up = redis_up or temporal_up  # one engine is enough: dispatch falls back to the other
    return SafeJSONResponse(
        {"status": "ok" if up else "unavailable", "redis": redis_up, "temporal": temporal_up},
        status.HTTP_200_OK if up else status.HTTP_503_SERVICE_UNAVAILABLE,
    )


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    dependencies=TOKEN,
    responses={
        **TOKEN_RESPONSES,
        200: {"description": "Prometheus text", "content": {"text/plain": {}}},
    },
)
def metrics() -> Response:
    """Prometheus text exposition (a scraper sends a token: `authorization.credentials`)."""
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)


@router.get("/openapi.json", include_in_schema=False, dependencies=TOKEN)
def openapi(request: Request) -> JSONResponse:
    app = request.app
    if app.openapi_schema is None:
        app.openapi_schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
        )
    return SafeJSONResponse(app.openapi_schema)

"""The HTTP API: dispatch, inspect and steer jobs on either engine, plus the dashboard.

`create_app` assembles the app from its parts, one job each:

* routers: jobs.py (dispatch, list, inspect, replay, cancel), events.py (Server-Sent Events),
  admin.py (bulk replay, queues, workers), ops.py (health, metrics, queue history, the OpenAPI
  schema), dashboard.py, schedules.py;
* errors.py, the mapping of jobyard's errors to HTTP statuses, in one place;
* views.py (what a job looks like over HTTP), responses.py (the answers routes share and the
  statuses they document), params.py (the parameters they accept).

Every route is a thin translation of a `jobyard.dispatcher` call. Closed by default (see
auth.py and guard.py): every route but GET /health needs a bearer token, admin routes an admin
token; jobs declared `http=False` cannot be started here at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from jobyard.api import admin, codec, dashboard, events, jobs, ops
from jobyard.api.errors import install_error_handlers
from jobyard.api.guard import GuardMiddleware
from jobyard.api.health import TemporalProbe
from jobyard.api.responses import SafeJSONResponse
from jobyard.api.schedules import router as schedules_router
from jobyard.dispatcher import warm_up


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
        # The schema is served by ops.py behind a token; the docs pages load scripts from a
        # CDN, which neither the CSP nor machines without internet allow.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(GuardMiddleware)
    install_error_handlers(app)
    app.state.temporal_probe = TemporalProbe()  # GET /health's, one per app
    app.include_router(schedules_router)  # admin-only (require_admin on the router)
    # events before jobs: a job id may hold slashes, so GET /jobs/{job_id:path} would also
    # match /jobs/{job_id}/events.
    for router in (
        events.router,
        jobs.router,
        admin.router,
        ops.router,
        dashboard.router,
        codec.router,
    ):
        app.include_router(router)
    return app

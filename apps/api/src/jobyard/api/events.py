"""A job's events as Server-Sent Events: GET /jobs/{job_id}/events, resumable by event id; and
events from outside for waiting jobs: POST /events/{name} (`send_event`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Path, Query, Request, status
from fastapi.responses import Response, StreamingResponse

from jobyard.api.auth import TOKEN
from jobyard.api.params import JobIdPath
from jobyard.api.responses import (
    TOKEN_RESPONSES,
    WRITE_RESPONSES,
    SafeJSONResponse,
    doc,
    printable,
    unprocessable,
    validation_detail,
)
from jobyard.dispatcher import asend_event, get_job
from jobyard.dispatcher.events import ajob_events, stream_position
from jobyard.job_engine import strictjson
from jobyard.job_engine.states import JobState

FINAL_STATES = tuple(state for state in JobState if state.final)
#: How soon an EventSource reconnects after a dropped stream, and how often a quiet one pings.
SSE_RETRY_MS = 1000
KEEPALIVE_SECONDS = 15.0

router = APIRouter()


def last_event_id(header: str | None, after: int | None) -> int:
    """Where a stream resumes: the Last-Event-ID header (what EventSource sends) or ?after=."""
    if header is not None and header.strip().isdigit():
        return int(header.strip())
    return after or 0


async def sse(job_id: str, after: int, request: Request) -> AsyncIterator[str]:
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
            data = json.dumps(printable(event.as_dict()), ensure_ascii=True, allow_nan=False)
            yield f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n"
    finally:
        if pending is not None:  # the client left mid-read: let that read finish cancelling
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await events.aclose()


@router.get(
    "/jobs/{job_id:path}/events",
    tags=["jobs"],
    dependencies=TOKEN,
    response_class=StreamingResponse,
    responses={
        **TOKEN_RESPONSES,
        200: {"description": "Server-Sent Events", "content": {"text/event-stream": {}}},
        204: doc("the job is finished and the client has seen its last event"),
        404: doc("no such job"),
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
    resume = last_event_id(request.headers.get("last-event-id"), after)
    position = await asyncio.to_thread(stream_position, job_id)
    if position is None:
        await asyncio.to_thread(get_job, job_id)  # JobNotFoundError: 404
    elif position[1] in FINAL_STATES and resume >= position[0]:
        return Response(status_code=status.HTTP_204_NO_CONTENT)  # stops EventSource
    return StreamingResponse(
        sse(job_id, resume, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/events/{name}",
    status_code=status.HTTP_202_ACCEPTED,
    tags=["events"],
    dependencies=TOKEN,
    responses={
        **TOKEN_RESPONSES,
        **WRITE_RESPONSES,
        422: doc("an invalid event name, or a body that is not a JSON object"),
    },
)
async def send(
    request: Request, name: str = Path(description="The event's name, e.g. payment.confirmed")
) -> Response:
    """Send event `name` with the JSON object body as its data: every job waiting for it in
    `ctx.wait_for_event(name, match=...)` whose match fields equal the data's resumes with it,
    and so does one whose wait begins within JOBYARD_EVENT_LOOKBACK seconds."""
    try:
        data = strictjson.loads(await request.body())
        event_id = await asend_event(name, data)
    except ValueError as exc:  # the name, the JSON (StrictJSONError is one) or not an object
        return unprocessable(validation_detail(["body"], str(exc), "event_invalid"))
    return SafeJSONResponse({"event_id": event_id, "name": name}, status.HTTP_202_ACCEPTED)

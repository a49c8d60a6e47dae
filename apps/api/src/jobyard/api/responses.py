"""What routes answer: the JSON response class every route uses, the shapes of the answers
several routes share (202 accepted, 422, 503 with a retry hint), and the statuses routes
document in the OpenAPI schema."""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import quote

from fastapi import Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from jobyard.dispatcher import JobHandle
from jobyard.job_engine import strictjson

#: Seconds a client should wait before retrying when no engine could take a job. The
#: dispatcher's Redis probe runs every fraction of a second and a Temporal start times out in
#: ~2 s, so a few seconds is long enough for either to have changed its mind.
RETRY_AFTER_SECONDS = 5


def doc(description: str) -> dict[str, Any]:
    return {"description": description}


TOKEN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: doc("missing or wrong bearer token (or none configured on the server)"),
    503: doc("a service this route needs (Redis, the job log database, Temporal) is down"),
}
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **TOKEN_RESPONSES,
    403: doc("an API token on an admin route, or a cross-origin request"),
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
    422: doc("invalid filter or cursor"),
}
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: doc("request body too large"),
    415: doc("the body is not application/json"),
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
                printable(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")
            ).encode("ascii")


def printable(value: Any, depth: int = 0) -> Any:
    """`value` with what JSON cannot carry replaced: non-finite numbers by None, unknown types
    by their repr, anything nested past strictjson.MAX_DEPTH by a marker."""
    if depth > strictjson.MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, dict):
        return {str(k): printable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def validation_detail(loc: list[Any], msg: str, kind: str) -> list[dict[str, Any]]:
    """One error in the shape FastAPI uses for its own 422s, so clients parse one format."""
    return [{"type": kind, "loc": loc, "msg": msg}]


def unprocessable(detail: list[dict[str, Any]]) -> JSONResponse:
    return SafeJSONResponse(
        {"detail": jsonable_encoder(detail)}, status.HTTP_422_UNPROCESSABLE_CONTENT
    )


def unavailable(detail: str) -> JSONResponse:
    return SafeJSONResponse(
        {"detail": detail},
        status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def status_url(request: Request, job_id: str) -> str:
    # root_path keeps the link right when web code mounts this app under a prefix.
    return f"{request.scope.get('root_path', '')}/jobs/{quote(job_id, safe='')}"


def accepted(request: Request, handle: JobHandle) -> JSONResponse:
    url = status_url(request, handle.job_id)
    body = {
        "job_id": handle.job_id,
        "engine": handle.engine,
        "status_url": url,
        "fallback_reason": handle.fallback_reason,
        "duplicate": handle.duplicate,
        "served_by": handle.served_by,  # a debounced dispatch collapsed into this job's run
    }
    return SafeJSONResponse(body, status.HTTP_202_ACCEPTED, headers={"Location": url})

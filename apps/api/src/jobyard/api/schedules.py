"""Admin routes for schedules: list, pause, resume, trigger, backfill (same as `jobyard schedules`).

Every route needs the admin token (`require_admin`): pausing or firing a schedule steers
production work. Routes are plain `def`: they talk to the database and the engines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import AwareDatetime, BaseModel
from sqlalchemy.exc import SQLAlchemyError

from jobyard.api.auth import require_admin
from jobyard.dispatcher import scheduler
from jobyard.job_engine import ScheduleError, schedule_registry

#: What any admin route may answer besides its own statuses (the token, the guard, outages).
ADMIN_ROUTE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body is not valid JSON"},
    401: {"description": "missing or wrong bearer token (or none configured on the server)"},
    403: {"description": "an API token on an admin route, or a cross-origin request"},
    413: {"description": "request body too large"},
    415: {"description": "the body is not application/json"},
    503: {"description": "the database this route needs is down"},
}
router = APIRouter(
    prefix="/schedules",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=ADMIN_ROUTE_RESPONSES,
)


class BackfillRequest(BaseModel):
    start: AwareDatetime
    end: AwareDatetime


def _call(fn: Callable[..., dict[str, Any]], name: str, *args: Any) -> dict[str, Any]:
    if name not in {s.name for s in schedule_registry.declared()}:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown schedule {name!r}")
    try:
        return fn(name, *args)
    except ScheduleError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except SQLAlchemyError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"database unavailable: {type(exc).__name__}"
        ) from None


@router.get("")
def list_schedules() -> list[dict[str, Any]]:
    """Every schedule: job, spec, zone, paused, next and last fire, the last job's state."""
    try:
        return scheduler.list_schedules()
    except SQLAlchemyError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"database unavailable: {type(exc).__name__}"
        ) from None


@router.post("/{name}/pause", responses={404: {}})
def pause(name: str) -> dict[str, Any]:
    """Stop firing until resumed; kept in the database, so it survives restarts."""
    return _call(scheduler.pause_schedule, name)


@router.post("/{name}/resume", responses={404: {}})
def resume(name: str) -> dict[str, Any]:
    """Fire again from now on (the ticks that fell in the pause are not fired)."""
    return _call(scheduler.resume_schedule, name)


@router.post("/{name}/trigger", status_code=status.HTTP_202_ACCEPTED, responses={404: {}})
def trigger(name: str) -> dict[str, Any]:
    """Run the schedule's job once now."""
    return _call(scheduler.trigger_schedule, name)


@router.post("/{name}/backfill", status_code=status.HTTP_202_ACCEPTED, responses={404: {}, 422: {}})
def backfill(name: str, body: BackfillRequest) -> dict[str, Any]:
    """Fire the ticks in [start, end] that never fired (a tick runs once, ever)."""
    return _call(scheduler.backfill_schedule, name, body.start, body.end)

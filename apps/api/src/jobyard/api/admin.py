"""Admin routes beyond one job: dead letters replayed in bulk, queues, workers (admin token)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from jobyard.api.auth import ADMIN
from jobyard.api.params import JOB_ID_PATH, NAME_PATTERN, Engine
from jobyard.api.responses import (
    ADMIN_RESPONSES,
    WRITE_RESPONSES,
    SafeJSONResponse,
    doc,
    unprocessable,
    validation_detail,
)
from jobyard.dispatcher import (
    JobNotFoundError,
    JobStillActiveError,
    flow_counts,
    list_jobs,
    list_workers,
    queue_stats,
    replay_job,
)
from jobyard.job_engine.states import JobState

#: Dead jobs one POST /dead/replay runs again (each is a call to its engine).
MAX_BULK_REPLAY = 500

router = APIRouter()


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


@router.post(
    "/dead/replay",
    dependencies=ADMIN,
    tags=["admin"],
    responses={
        **ADMIN_RESPONSES,
        **WRITE_RESPONSES,
        400: doc("the body is not valid JSON"),
        422: doc("neither ids nor a filter, or an invalid one"),
    },
)
def replay_dead(body: BulkReplay) -> JSONResponse:
    """Replay several dead jobs: the listed `job_ids`, or (`all: true`) every dead job that
    matches the filter, up to MAX_BULK_REPLAY per call (`more` says whether some are left).
    Each id's outcome: "replayed" with its engine, or why not; with `all`, a job the job log
    still lists as dead but that is already running again is left out, as no longer matching."""
    if body.job_ids:
        ids = body.job_ids
    elif body.all:
        found = list_jobs(
            state=JobState.DEAD, name=body.name, queue=body.queue, engine=body.engine,
            since=body.since, until=body.until, limit=MAX_BULK_REPLAY,
        )  # fmt: skip
        ids = [record.job_id for record in found]
    else:
        return unprocessable(validation_detail(["body"], "give job_ids, or all: true", "missing"))
    outcomes: dict[str, dict[str, Any]] = {}
    for job_id in ids:
        try:
            handle = replay_job(job_id)
            outcomes[job_id] = {"outcome": "replayed", "engine": handle.engine}
        except JobStillActiveError as exc:
            if not body.all:  # a filter's pick came from the job log, which may lag a replay
                outcomes[job_id] = {"outcome": "active", "state": exc.state}
        except JobNotFoundError:
            outcomes[job_id] = {"outcome": "not_found"}
    replayed = sum(o["outcome"] == "replayed" for o in outcomes.values())
    more = bool(body.all and len(ids) == MAX_BULK_REPLAY)
    return SafeJSONResponse({"replayed": replayed, "jobs": outcomes, "more": more})


@router.get("/queues", dependencies=ADMIN, tags=["admin"], responses={**ADMIN_RESPONSES})
def queues() -> list[dict[str, Any]]:
    return [stats.as_dict() for stats in queue_stats()]


@router.get("/flow", dependencies=ADMIN, tags=["admin"], responses={**ADMIN_RESPONSES})
def flow() -> list[dict[str, Any]]:
    """Flow control now: the limits' keys holding runs or waiting jobs, most waiting first (the
    20 busiest; Prometheus has every limit's totals)."""
    return flow_counts()


@router.get("/workers", dependencies=ADMIN, tags=["admin"], responses={**ADMIN_RESPONSES})
def workers() -> list[dict[str, Any]]:
    return [worker.as_dict() for worker in list_workers()]

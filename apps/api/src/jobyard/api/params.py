"""What routes accept: the patterns, bounds and parameter types several routers share."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query

from jobyard.dispatcher.dispatch import JOB_ID_PATTERN
from jobyard.job_engine.states import JobState

__all__ = ["JobState"]  # routers take a job state as this enum (FastAPI gives 422 for others)

MAX_PAGE = 500
#: Deepest offset a listing pages to; past it the database would scan (or overflow) for nothing.
MAX_OFFSET = 1_000_000
Engine = Literal["dramatiq", "temporal"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}$"  # job and queue names
JOB_ID_PATH = f"^{JOB_ID_PATTERN.pattern}$"

DISPATCH_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The job's payload, validated against the job's schema (strict JSON).",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}

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

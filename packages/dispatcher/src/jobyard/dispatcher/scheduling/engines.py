"""How the scheduler reaches the engines: a dispatch and a status callable, the dispatcher's
own by default (a test passes stand-ins that count every call)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Dispatch = Callable[[str, dict[str, Any], str], Any]  # (job, payload, job_id) -> JobHandle
Status = Callable[[str], Any]  # job_id -> JobStatus or None (not found)


def dispatch_with_id(name: str, payload: dict[str, Any], job_id: str) -> Any:
    from jobyard.dispatcher.dispatch import dispatch_job

    return dispatch_job(name, payload, job_id=job_id)


def job_status(job_id: str) -> Any:
    from jobyard.dispatcher.dispatch import get_job
    from jobyard.dispatcher.errors import JobNotFoundError

    try:
        return get_job(job_id)
    except JobNotFoundError:
        return None

"""`dispatch_job(..., after=[job_id, ...])`: the ids must name jobs that exist when it is
dispatched (so no cycle can form). The waiting itself happens where the job runs, on either
engine, before its handler (`BaseJobContext.wait_upstream`, jobyard.job_engine.waits)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobyard.dispatcher.errors import JobNotFoundError, UnknownUpstreamError
from jobyard.job_engine.db import joblog


def check_upstream(after: dict[str, Any] | None, status: Callable[[str], Any]) -> None:
    """UnknownUpstreamError for the first id `status` (the dispatcher's lookup on both engines
    and the job log) does not find."""
    if not after:
        return
    if not joblog.enabled():  # where the job learns how the others ended
        raise ValueError("after= needs the job log (JOBYARD_JOB_LOG=true and a DATABASE_URL)")
    for job_id in after["ids"]:
        try:
            status(job_id)
        except JobNotFoundError:
            raise UnknownUpstreamError(job_id) from None


def check_not_transactional(connection: Any, after: list[str] | None) -> None:
    """A job dispatched in a transaction (`connection=`) cannot wait for others yet: the
    dispatch outbox does not carry `after`. Refused, rather than the dependency dropped."""
    if connection is not None and after:
        raise ValueError("after= cannot be combined with connection= (not supported yet)")

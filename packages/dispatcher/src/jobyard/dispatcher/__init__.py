"""jobyard.dispatcher: dispatch_job() and get_job(), on Dramatiq with a Temporal fallback."""

from jobyard.dispatcher.dispatch import (
    Dispatcher,
    adispatch_job,
    aget_job,
    dispatch_job,
    get_dispatcher,
    get_job,
    reset_dispatcher,
    warm_up,
)
from jobyard.dispatcher.errors import DispatchUnavailableError, EngineUnavailable, JobNotFoundError
from jobyard.dispatcher.models import JobHandle, JobStatus

__all__ = [
    "DispatchUnavailableError",
    "Dispatcher",
    "EngineUnavailable",
    "JobHandle",
    "JobNotFoundError",
    "JobStatus",
    "adispatch_job",
    "aget_job",
    "dispatch_job",
    "get_dispatcher",
    "get_job",
    "reset_dispatcher",
    "warm_up",
]

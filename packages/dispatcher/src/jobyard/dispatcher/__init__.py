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
from jobyard.dispatcher.errors import (
    DispatchOutcomeUnknownError,
    DispatchUnavailableError,
    EngineUnavailable,
    IdempotencyConflictError,
    JobNotFoundError,
    JobStillActiveError,
)
from jobyard.dispatcher.lifecycle import (
    JobRecord,
    QueueStats,
    WorkerInfo,
    cancel_job,
    get_job_record,
    get_job_steps,
    list_jobs,
    list_workers,
    queue_stats,
    replay_job,
)
from jobyard.dispatcher.models import JobHandle, JobStatus

__all__ = [
    "DispatchOutcomeUnknownError",
    "DispatchUnavailableError",
    "Dispatcher",
    "EngineUnavailable",
    "IdempotencyConflictError",
    "JobHandle",
    "JobNotFoundError",
    "JobRecord",
    "JobStatus",
    "JobStillActiveError",
    "QueueStats",
    "WorkerInfo",
    "adispatch_job",
    "aget_job",
    "cancel_job",
    "dispatch_job",
    "get_dispatcher",
    "get_job",
    "get_job_record",
    "get_job_steps",
    "list_jobs",
    "list_workers",
    "queue_stats",
    "replay_job",
    "reset_dispatcher",
    "warm_up",
]

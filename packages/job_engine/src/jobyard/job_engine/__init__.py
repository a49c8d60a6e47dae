"""jobyard.job_engine: declare jobs once, run them on any engine.

See `jobyard.job_engine.context` for the rules a handler body follows.
"""

from jobyard.job_engine.context import JobContext, resolve_step, step_ref
from jobyard.job_engine.errors import (
    ChildFailedError,
    IdempotencyConflictError,
    InvalidPayloadError,
    JobyardError,
    MissingSettingError,
    PayloadTooLargeError,
    PermanentError,
    StepError,
    UnknownJobError,
    UnsafeURLError,
    UpstreamFailedError,
)
from jobyard.job_engine.flow.declarations import (
    Concurrency,
    Debounce,
    FlowDeclarationError,
    InvalidPriorityError,
    MissingKeyError,
)
from jobyard.job_engine.ids import new_job_id, new_job_ids
from jobyard.job_engine.policy import RateLimit, RetryPolicy
from jobyard.job_engine.queues import QueueConfig, QueueError, UnknownQueueError, queue
from jobyard.job_engine.registry import JobSpec, get_spec, job, registry
from jobyard.job_engine.schedules import Schedule, ScheduleError, schedule, schedule_registry
from jobyard.job_engine.states import JobState

__all__ = [
    "ChildFailedError",
    "Concurrency",
    "Debounce",
    "FlowDeclarationError",
    "IdempotencyConflictError",
    "InvalidPayloadError",
    "InvalidPriorityError",
    "JobContext",
    "JobSpec",
    "JobState",
    "JobyardError",
    "MissingKeyError",
    "MissingSettingError",
    "PayloadTooLargeError",
    "PermanentError",
    "QueueConfig",
    "QueueError",
    "RateLimit",
    "RetryPolicy",
    "Schedule",
    "ScheduleError",
    "StepError",
    "UnknownJobError",
    "UnknownQueueError",
    "UnsafeURLError",
    "UpstreamFailedError",
    "get_spec",
    "job",
    "new_job_id",
    "new_job_ids",
    "queue",
    "registry",
    "resolve_step",
    "schedule",
    "schedule_registry",
    "step_ref",
]

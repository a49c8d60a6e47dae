"""jobyard.job_engine: declare jobs once, run them on any engine.

See `jobyard.job_engine.context` for the rules a handler body follows.
"""

from jobyard.job_engine.context import JobContext, resolve_step, step_ref
from jobyard.job_engine.errors import (
    IdempotencyConflictError,
    InvalidPayloadError,
    JobyardError,
    MissingSettingError,
    PayloadTooLargeError,
    PermanentError,
    StepError,
    UnknownJobError,
    UnsafeURLError,
)
from jobyard.job_engine.policy import RateLimit, RetryPolicy
from jobyard.job_engine.registry import JobSpec, get_spec, job, registry
from jobyard.job_engine.schedules import Schedule, ScheduleError, schedule, schedule_registry

__all__ = [
    "IdempotencyConflictError",
    "InvalidPayloadError",
    "JobContext",
    "JobSpec",
    "JobyardError",
    "MissingSettingError",
    "PayloadTooLargeError",
    "PermanentError",
    "RateLimit",
    "RetryPolicy",
    "Schedule",
    "ScheduleError",
    "StepError",
    "UnknownJobError",
    "UnsafeURLError",
    "get_spec",
    "job",
    "registry",
    "resolve_step",
    "schedule",
    "schedule_registry",
    "step_ref",
]

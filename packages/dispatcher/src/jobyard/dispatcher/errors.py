"""The dispatcher's own errors. Engine libraries' errors are translated into these at the edge."""

from __future__ import annotations

from jobyard.job_engine import IdempotencyConflictError, JobyardError

__all__ = [
    "DispatchOutcomeUnknownError",
    "DispatchUnavailableError",
    "EngineUnavailable",
    "IdempotencyConflictError",
    "JobLogBacklogError",
    "JobNotFoundError",
    "JobStillActiveError",
    "UnknownUpstreamError",
]


class EngineUnavailable(JobyardError):
    """An engine could not take the job. `ambiguous` when the request may have reached it."""

    def __init__(self, engine: str, reason: str, *, ambiguous: bool = False) -> None:
        super().__init__(f"{engine} unavailable: {reason}")
        self.engine = engine
        self.reason = reason
        self.ambiguous = ambiguous


class DispatchUnavailableError(JobyardError):
    """Neither engine could take the job; it was not started and the caller must retry."""


class JobLogBacklogError(DispatchUnavailableError):
    """This process holds too many job log events it could not write (the database is down):
    a job dispatched now might never reach the log, so nothing would find it again if Redis
    lost it. Nothing was started; dispatch again once the database is back."""


class DispatchOutcomeUnknownError(JobyardError):
    """An engine may have taken the job, but did not say so in time (Redis or Temporal stopped
    answering mid-request). The job may run; dispatching again with the same job_id is safe:
    it starts the job if nothing did, and is a duplicate otherwise."""

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFoundError(JobyardError, LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r} on either engine")
        self.job_id = job_id


class JobStillActiveError(JobyardError):
    """Replay refused: the job is queued or running; replaying it would run it twice."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id!r} is {state}; only dead, failed or cancelled jobs replay")
        self.job_id = job_id
        self.state = state


class UnknownUpstreamError(JobyardError, LookupError):
    """`after=` names a job id neither engine nor the job log knows: nothing was started. (A
    dependency must exist when its dependant is dispatched, so `after=` can form no cycle.)"""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"after: no job with id {job_id!r}; nothing was started")
        self.job_id = job_id

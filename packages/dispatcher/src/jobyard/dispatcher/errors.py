"""The dispatcher's own errors. Engine libraries' errors are translated into these at the edge."""

from __future__ import annotations

from jobyard.job_engine import JobyardError


class EngineUnavailable(JobyardError):
    """An engine could not take the job. `ambiguous` when the request may have reached it."""

    def __init__(self, engine: str, reason: str, *, ambiguous: bool = False) -> None:
        super().__init__(f"{engine} unavailable: {reason}")
        self.engine = engine
        self.reason = reason
        self.ambiguous = ambiguous


class DispatchUnavailableError(JobyardError):
    """Neither engine could take the job; it was not started and the caller must retry."""


class JobNotFoundError(JobyardError, LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r} on either engine")
        self.job_id = job_id

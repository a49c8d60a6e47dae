"""A job's own exception -> its final state, as the other engines report it."""

from __future__ import annotations

from jobyard.job_engine import PermanentError, StepError
from jobyard.job_engine.states import JobState


def failure_of(exc: BaseException) -> tuple[JobState, str]:
    """(state, error): retries already ran inside the context, so what escapes is final."""
    if isinstance(exc, TimeoutError):
        return JobState.FAILED, "TimeoutError: the job ran past its timeout"
    if isinstance(exc, PermanentError | StepError):
        return JobState.FAILED, f"{type(exc).__name__}: {exc}"
    return JobState.DEAD, f"{type(exc).__name__}: {exc}"

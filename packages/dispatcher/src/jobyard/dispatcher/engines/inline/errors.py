"""A job's own exception -> its final state, as the other engines report it."""

from __future__ import annotations

from jobyard.job_engine import PermanentError, StepError


def failure_of(exc: BaseException) -> tuple[str, str]:
    """(state, error): retries already ran inside the context, so what escapes is final."""
    if isinstance(exc, TimeoutError):
        return "failed", "TimeoutError: the job ran past its timeout"
    if isinstance(exc, PermanentError | StepError):
        return "failed", f"{type(exc).__name__}: {exc}"
    return "dead", f"{type(exc).__name__}: {exc}"

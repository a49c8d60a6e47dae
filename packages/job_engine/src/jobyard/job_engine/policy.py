"""Retry, timeout and rate-limit settings of a job, with their env-var overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from jobyard.job_engine.errors import FlowDeclarationError

#: The number types an env override parses to.
_N = TypeVar("_N", int, float)


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` runs in all (1 = no retry); the n-th retry waits `backoff * 2**(n-1)` seconds."""

    attempts: int = 3
    backoff: float = 1.0
    max_backoff: float = 3600.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("RetryPolicy backoff values must not be negative")

    def with_overrides(self, overrides: dict[str, Any] | None) -> RetryPolicy:
        """This policy with `attempts` / `backoff` replaced (a per-dispatch override)."""
        if not overrides:
            return self
        known = {k: overrides[k] for k in ("attempts", "backoff") if overrides.get(k) is not None}
        return replace(self, **known)

    def overrides(self) -> dict[str, Any]:
        """The JSON form a dispatch override travels in."""
        return {"attempts": self.attempts, "backoff": self.backoff}

    def delay_before(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        factor: int = 2 ** max(0, retry - 1)  # typeshed types int ** int as Any (negative powers)
        return min(self.max_backoff, self.backoff * factor)


def check_key_syntax(path: str | None, what: str) -> None:
    """A flow-control key path is dot-separated, non-empty payload field names."""
    if path is None:
        return
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise FlowDeclarationError(
            f"{what}: key must be a payload field name, dotted for nested fields"
            f" (e.g. 'tenant_id' or 'account.tenant_id'), got {path!r}"
        )


@dataclass(frozen=True)
class RateLimit:
    """At most `calls` starts per `period` seconds for each value of the payload field `key`
    (dotted for nested; one bucket when None), counted across every worker of both engines
    (the permit store, see docs/flow-control.md). A start is the handler beginning."""

    calls: int
    period: float = 60.0
    key: str | None = None

    def __post_init__(self) -> None:
        if type(self.calls) is not int or self.calls < 1:
            raise FlowDeclarationError(
                f"RateLimit.calls must be a whole number of at least 1: {self.calls!r}"
            )
        period = self.period
        if (
            isinstance(period, bool)
            or not isinstance(period, int | float)
            or not 0 < period < float("inf")
        ):
            raise FlowDeclarationError(
                f"RateLimit.period must be a positive number of seconds: {period!r}"
            )
        check_key_syntax(self.key, "RateLimit")


def env_key(job_name: str, field: str) -> str:
    """`webhook.deliver`, `attempts` -> `JOBYARD_JOB_WEBHOOK_DELIVER_ATTEMPTS`."""
    slug = "".join(ch if ch.isalnum() else "_" for ch in job_name).upper()
    return f"JOBYARD_JOB_{slug}_{field.upper()}"


def _env_number(key: str, cast: type[_N]) -> _N | None:
    raw = os.environ.get(key)
    if raw is None or raw == "":
        return None
    try:
        return cast(raw)
    except ValueError as exc:
        raise ValueError(f"{key}={raw!r} is not a valid {cast.__name__}") from exc


def retry_with_env(job_name: str, policy: RetryPolicy) -> RetryPolicy:
    attempts = _env_number(env_key(job_name, "attempts"), int)
    backoff = _env_number(env_key(job_name, "backoff"), float)
    return replace(
        policy,
        attempts=policy.attempts if attempts is None else attempts,
        backoff=policy.backoff if backoff is None else backoff,
    )


def timeout_with_env(job_name: str, timeout: float) -> float:
    override = _env_number(env_key(job_name, "timeout"), float)
    return timeout if override is None else override

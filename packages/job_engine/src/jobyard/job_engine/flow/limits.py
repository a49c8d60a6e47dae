"""The limits a job is under (`job_limits`): its own and its queue's, each with the
permit-store scope it counts in. Imports no database driver: the registry computes a job's
limits at declaration, and an unlimited job never loads the permit store."""

from __future__ import annotations

from dataclasses import dataclass

from jobyard.job_engine.flow.declarations import Concurrency, Debounce
from jobyard.job_engine.flow.limiter import CONCURRENCY, DEBOUNCE, RATE
from jobyard.job_engine.flow.waiting import JOB, QUEUE, scope
from jobyard.job_engine.policy import RateLimit


@dataclass(frozen=True)
class DeclaredLimit:
    """One limit a job is under, and the permit-store scope it counts in."""

    kind: str
    scope: str
    declaration: RateLimit | Concurrency | Debounce

    @property
    def key_path(self) -> str | None:
        return getattr(self.declaration, "key", None)


def job_limits(
    job_name: str,
    queue: str,
    *,
    rate_limit: RateLimit | None = None,
    concurrency: Concurrency | None = None,
    debounce: Debounce | None = None,
    queue_rate_limit: RateLimit | None = None,
    queue_concurrency: Concurrency | None = None,
) -> tuple[DeclaredLimit, ...]:
    """Every limit a job is under: its own, then its queue's (a queue's limit counts the
    starts or runs of all its jobs together). Empty for an unlimited job, which then never
    touches the permit store."""
    limits: list[DeclaredLimit] = []
    if debounce is not None:
        limits.append(DeclaredLimit(DEBOUNCE, scope(DEBOUNCE, JOB, job_name), debounce))
    for kind, owner_kind, owner, declared in (
        (RATE, JOB, job_name, rate_limit),
        (RATE, QUEUE, queue, queue_rate_limit),
        (CONCURRENCY, JOB, job_name, concurrency),
        (CONCURRENCY, QUEUE, queue, queue_concurrency),
    ):
        if declared is not None:
            limits.append(DeclaredLimit(kind, scope(kind, owner_kind, owner), declared))
    return tuple(limits)

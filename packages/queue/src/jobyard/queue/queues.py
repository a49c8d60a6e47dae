"""The queue registry: each queue's concurrency, time limit and retry defaults, env-overridable.

`WORKER_CONCURRENCY_<QUEUE>`, `WORKER_PREFETCH_<QUEUE>`, `QUEUE_TIME_LIMIT_<QUEUE>` (seconds) and
`QUEUE_MAX_ATTEMPTS_<QUEUE>` override the defaults; <QUEUE> is the name upper-cased with `-` as `_`.

Prefetch is how many messages a worker process holds per queue (running or waiting for a
thread), as a multiple of its concurrency: a high one keeps threads busy on short jobs; a low
one leaves long jobs on the queue for other workers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from jobyard.job_engine import JobSpec, RetryPolicy, env

DEFAULT = "default"
DATA_SYNC = "data-sync"
SCHEDULED = "scheduled"


@dataclass(frozen=True)
class QueueConfig:
    name: str
    concurrency: int
    time_limit: float  # seconds; a job on this queue never runs longer, whatever it declares
    max_attempts: int  # cap on a job's declared attempts
    description: str
    prefetch_factor: int = 2  # messages held per worker process, per thread

    @property
    def prefetch(self) -> int:
        return max(1, self.concurrency * self.prefetch_factor)

    @staticmethod
    def env_suffix(name: str) -> str:
        return name.upper().replace("-", "_").replace(".", "_")

    def with_env(self) -> QueueConfig:
        suffix = self.env_suffix(self.name)
        return QueueConfig(
            name=self.name,
            concurrency=env.get_int(f"WORKER_CONCURRENCY_{suffix}", self.concurrency),
            time_limit=env.get_float(f"QUEUE_TIME_LIMIT_{suffix}", self.time_limit),
            max_attempts=env.get_int(f"QUEUE_MAX_ATTEMPTS_{suffix}", self.max_attempts),
            description=self.description,
            prefetch_factor=env.get_int(f"WORKER_PREFETCH_{suffix}", self.prefetch_factor),
        )


_QUEUES = {
    q.name: q
    for q in (
        QueueConfig(DEFAULT, 10, 300, 10, "high concurrency, short I/O jobs", prefetch_factor=4),
        QueueConfig(
            DATA_SYNC, 2, 3600, 5, "low concurrency, long-running, DB-heavy jobs", prefetch_factor=1
        ),
        QueueConfig(SCHEDULED, 4, 1800, 5, "scheduled and periodic maintenance", prefetch_factor=1),
    )
}


def queue_names() -> list[str]:
    return list(_QUEUES)


def get_queue(name: str) -> QueueConfig:
    try:
        return _QUEUES[name].with_env()
    except KeyError as exc:
        raise ValueError(f"unknown queue {name!r} (queues: {', '.join(_QUEUES)})") from exc


def parse_queue_list(text: str | None) -> list[str]:
    """`"default,data-sync"` -> validated names; empty or None -> all queues."""
    if not text:
        return queue_names()
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        get_queue(name)
    return names


def retry_policy(spec: JobSpec, overrides: dict[str, Any] | None = None) -> RetryPolicy:
    """The retry policy a run follows, on either engine: the job's (env-overridable), then the
    dispatch's override, capped by the queue's QUEUE_MAX_ATTEMPTS_<QUEUE>."""
    policy = spec.effective_retry().with_overrides(overrides)
    cap = get_queue(spec.queue).max_attempts if spec.queue in _QUEUES else policy.attempts
    return replace(policy, attempts=min(policy.attempts, cap))

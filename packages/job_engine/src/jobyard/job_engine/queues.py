"""The queue registry: the queues an app declares, with their concurrency, time limit, retry cap
and rate limit, env-overridable. Engine-neutral: the Dramatiq worker, the Temporal worker and the
dispatcher all read queues here.

    from jobyard.job_engine import RateLimit, queue

    queue("ai", concurrency=3, time_limit=120, rate_limit=RateLimit(60, 60.0))

    @job("ai.summarise", queue="ai", payload=SummarisePayload)
    async def summarise(ctx, payload): ...

A job module declares its queues before the jobs that use them (`@job` refuses a queue nobody
declared); the three built-in queues below are declared the same way. Declaring a queue again
with the same settings is a no-op; with other settings, an error.

`WORKER_CONCURRENCY_<QUEUE>`, `WORKER_PREFETCH_<QUEUE>`, `QUEUE_TIME_LIMIT_<QUEUE>` (seconds) and
`QUEUE_MAX_ATTEMPTS_<QUEUE>` override a declared queue's settings; <QUEUE> is the name
upper-cased with `-` as `_`.

Prefetch is how many messages a worker process holds per queue (running or waiting for a
thread), as a multiple of its concurrency: a high one keeps threads busy on short jobs; a low
one leaves long jobs on the queue for other workers.

A queue's `rate_limit` (at most `calls` starts of all its jobs per `period`, optionally per
key) and `concurrency_limit` (`Concurrency(limit, key)`: at most `limit` runs of its jobs at once
across every process, host and engine) are flow-control limits, held by the permit store on both
engines (docs/flow-control.md); `concurrency` is per worker process.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from jobyard.job_engine import env
from jobyard.job_engine.errors import JobyardError
from jobyard.job_engine.flow.declarations import Concurrency
from jobyard.job_engine.policy import RateLimit, RetryPolicy

if TYPE_CHECKING:
    from jobyard.job_engine.registry import JobSpec

DEFAULT = "default"
DATA_SYNC = "data-sync"
SCHEDULED = "scheduled"

#: A queue's name: it becomes part of Redis keys, a Dramatiq queue (whose delay queue appends
#: ".DQ") and env var names, so lower-case letters, digits, `-` and `_` only.
QUEUE_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class QueueError(JobyardError, ValueError):
    """A queue declared or named wrongly."""


class UnknownQueueError(QueueError, LookupError):
    """No queue is declared under this name."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown queue {name!r} (queues: {', '.join(known)}); declare it with "
            f"jobyard.job_engine.queue({name!r}, ...) before the jobs that use it"
        )
        self.name = name


@dataclass(frozen=True)
class QueueConfig:
    name: str
    concurrency: int  # jobs of this queue one worker process runs at once
    time_limit: float  # seconds; a job on this queue never runs longer, whatever it declares
    max_attempts: int  # cap on a job's declared attempts
    description: str = ""
    prefetch_factor: int = 2  # messages held per worker process, per thread
    #: Flow-control limits of all the queue's jobs together (see the module's docstring).
    rate_limit: RateLimit | None = None
    concurrency_limit: Concurrency | None = None

    def __post_init__(self) -> None:
        _check_settings({f.name: getattr(self, f.name) for f in fields(self)}, {})

    @property
    def prefetch(self) -> int:
        return max(1, self.concurrency * self.prefetch_factor)

    @staticmethod
    def env_suffix(name: str) -> str:
        return name.upper().replace("-", "_").replace(".", "_")

    def env_keys(self) -> dict[str, str]:
        """Each overridable field -> the env var that overrides it."""
        suffix = self.env_suffix(self.name)
        return {
            "concurrency": f"WORKER_CONCURRENCY_{suffix}",
            "time_limit": f"QUEUE_TIME_LIMIT_{suffix}",
            "max_attempts": f"QUEUE_MAX_ATTEMPTS_{suffix}",
            "prefetch_factor": f"WORKER_PREFETCH_{suffix}",
        }

    def with_env(self) -> QueueConfig:
        keys = self.env_keys()
        values: dict[str, Any] = {
            "concurrency": env.get_int(keys["concurrency"], self.concurrency),
            "time_limit": env.get_float(keys["time_limit"], self.time_limit),
            "max_attempts": env.get_int(keys["max_attempts"], self.max_attempts),
            "prefetch_factor": env.get_int(keys["prefetch_factor"], self.prefetch_factor),
        }
        overridden = {f: keys[f] for f, v in values.items() if v != getattr(self, f)}
        if not overridden:
            return self
        # Checked here first, so that the error names the env var a bad value came from.
        _check_settings({"name": self.name, **values}, overridden)
        return replace(self, **values)


def _check_settings(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Raise QueueError naming the first bad setting (and the env var it came from, if any)."""
    name = values["name"]

    def fail(field: str, rule: str) -> None:
        origin = f" (from {sources[field]})" if field in sources else ""
        raise QueueError(f"queue {name!r}: {field}={values[field]!r}{origin} {rule}")

    if not isinstance(name, str) or not QUEUE_NAME_PATTERN.fullmatch(name):
        raise QueueError(
            f"invalid queue name {name!r}: 1-63 characters of lower-case letters, "
            "digits, - and _, starting with a letter or digit"
        )
    for field in ("concurrency", "max_attempts", "prefetch_factor"):
        value = values.get(field, 1)
        if type(value) is not int or value < 1:
            fail(field, "must be a whole number of at least 1")
    limit = values.get("time_limit", 1)
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 < limit < 1e9:
        fail("time_limit", "must be a positive number of seconds")
    rate_limit = values.get("rate_limit")
    if rate_limit is not None and not isinstance(rate_limit, RateLimit):
        fail("rate_limit", "must be a jobyard.job_engine.RateLimit or None")
    shared = values.get("concurrency_limit")
    if shared is not None and not isinstance(shared, Concurrency):
        fail("concurrency_limit", "must be a jobyard.job_engine.Concurrency or None")
    if not isinstance(values.get("description", ""), str):
        fail("description", "must be a string")


_QUEUES: dict[str, QueueConfig] = {}
_lock = threading.Lock()


def queue(
    name: str,
    *,
    concurrency: int = 10,
    time_limit: float = 300.0,
    max_attempts: int = 10,
    rate_limit: RateLimit | None = None,
    prefetch_factor: int = 2,
    description: str = "",
    concurrency_limit: Concurrency | None = None,
) -> QueueConfig:
    """Declare the queue `name` (at a job module's top, before the jobs that use it).

    `concurrency`: jobs of the queue one worker process runs at once; `time_limit`: seconds one
    run may take, whatever the job declares; `max_attempts`: the cap on a job's attempts;
    `rate_limit`: starts of all its jobs per period (per key when keyed), on both engines;
    `concurrency_limit`: its runs at once across every process and engine (per key when
    keyed). Returns the declared config (the
    env overrides are applied by `get_queue`). Raises QueueError for a bad value, or for a
    queue declared before with other settings."""
    config = QueueConfig(
        name=name,
        concurrency=concurrency,
        time_limit=time_limit,
        max_attempts=max_attempts,
        description=description,
        prefetch_factor=prefetch_factor,
        rate_limit=rate_limit,
        concurrency_limit=concurrency_limit,
    )
    with _lock:
        existing = _QUEUES.get(name)
        if existing is not None:
            if existing != config:
                raise QueueError(
                    f"queue {name!r} is declared twice with different settings: "
                    f"{_settings(existing)} and {_settings(config)}"
                )
            return existing
        suffix = QueueConfig.env_suffix(name)
        for other in _QUEUES.values():
            if QueueConfig.env_suffix(other.name) == suffix:
                raise QueueError(
                    f"queue {name!r} and queue {other.name!r} would share the env overrides "
                    f"*_{suffix}: rename one"
                )
        _QUEUES[name] = config
    return config


def _settings(config: QueueConfig) -> str:
    shown = (
        "concurrency", "time_limit", "max_attempts", "rate_limit", "concurrency_limit",
        "prefetch_factor",
    )  # fmt: skip
    return ", ".join(f"{f}={getattr(config, f)!r}" for f in shown)


def _load_job_modules() -> None:
    # Imported here: the registry imports this module to check a job's queue.
    from jobyard.job_engine.registry import load_job_modules

    load_job_modules()


def is_declared(name: str) -> bool:
    """Whether `name` is declared, loading the job modules (JOBYARD_JOB_MODULES) first if it
    is not yet: a queue may be declared by a job module not imported so far."""
    if name not in _QUEUES:
        _load_job_modules()
    return name in _QUEUES


def declared(name: str) -> QueueConfig | None:
    """The declared queue `name` as declared (no env overrides, no job module loaded)."""
    return _QUEUES.get(name)


def declared_names() -> list[str]:
    """The queues declared so far in this process (no job module loaded for it)."""
    return list(_QUEUES)


def queue_names() -> list[str]:
    """Every declared queue, the job modules' included, in declaration order."""
    _load_job_modules()
    return list(_QUEUES)


def get_queue(name: str) -> QueueConfig:
    """The declared queue `name` with its env overrides; UnknownQueueError if none is."""
    if not is_declared(name):
        raise UnknownQueueError(name, list(_QUEUES))
    return _QUEUES[name].with_env()


def parse_queue_list(text: str | None) -> list[str]:
    """`"default,data-sync"` -> validated names; empty or None -> every declared queue."""
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


# The built-in queues, declared as an app declares its own.
queue(
    DEFAULT,
    concurrency=10,
    time_limit=300,
    max_attempts=10,
    prefetch_factor=4,
    description="high concurrency, short I/O jobs",
)
queue(
    DATA_SYNC,
    concurrency=2,
    time_limit=3600,
    max_attempts=5,
    prefetch_factor=1,
    description="low concurrency, long-running, DB-heavy jobs",
)
queue(
    SCHEDULED,
    concurrency=4,
    time_limit=1800,
    max_attempts=5,
    prefetch_factor=1,
    description="scheduled and periodic maintenance",
)

"""What dispatch and status lookups return."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from jobyard.job_engine.states import JobState

EngineName = Literal["dramatiq", "temporal", "inline", "outbox"]
#: The engine of a job dispatched in a transaction that no relay has sent yet (transactional.py).
OUTBOX_ENGINE: EngineName = "outbox"
#: Why a job went to Temporal. Also the `reason` label of the fallback metric.
FALLBACK_FLAG_OFF = "flag_off"
FALLBACK_REDIS_UNHEALTHY = "redis_unhealthy"
FALLBACK_REDIS_ERROR = "redis_error"
FALLBACK_NO_WORKERS = "no_live_workers"
FALLBACK_OWNED_BY_TEMPORAL = "owned_by_temporal"

FALLBACK_RESCUED = "rescued_from_dead_workers"


@dataclass(frozen=True)
class DispatchOptions:
    """What a caller may ask of one dispatch besides the payload (validated)."""

    delay: float | None = None  # seconds before the job may start
    webhook_url: str | None = None  # where the final state is POSTed
    retry: dict[str, Any] | None = None  # {"attempts", "backoff"} overriding the job's policy
    priority: int = 0  # -100..100, higher first (the job's own when the dispatch gave none)
    #: The jobs it starts after: {"ids": [job id, ...], "on_failure": "cancel" | "run"}
    #: (jobyard.job_engine.context.BaseJobContext.wait_upstream), None for most jobs.
    after: dict[str, Any] | None = None


NO_OPTIONS = DispatchOptions()  # frozen: shared by every dispatch that asks for nothing


@dataclass(frozen=True)
class DispatchRequest:
    """One job for `dispatch_many`: `dispatch_job`'s arguments."""

    name: str
    payload: Any
    job_id: str | None = None
    delay: float | None = None
    webhook_url: str | None = None
    retry: Any = None  # a jobyard.job_engine.RetryPolicy
    priority: int | None = None  # -100..100, higher first; None: the job's (@job priority=)
    after: list[str] | None = None  # job ids it starts after (dispatch_job's `after`)
    after_failure: str = "cancel"  # "cancel" | "run": when one of them did not succeed


@dataclass(frozen=True)
class JobHandle:
    job_id: str
    engine: EngineName
    fallback_reason: str | None = None
    duplicate: bool = False  # this job id was dispatched before; nothing new was started
    #: A debounced dispatch collapsed into another's run: that run's job id (its status is
    #: this job's too); None for a job that runs itself.
    served_by: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    engine: EngineName
    state: JobState
    attempts: int
    name: str | None = None
    result: Any = None
    error: str | None = None
    progress: Any = None
    run_at: float | None = None  # unix seconds: when a sleeping, delayed or retrying job runs
    #: What a queued job held by a flow-control limit shows (`throttled`, `waiting for slot`,
    #: `debouncing`, `collapsed`; see jobyard.job_engine.flow.waiting), else None.
    display_state: str | None = None
    #: Which limit holds it, and for which key (e.g. `concurrency limit
    #: concurrency:job:docs.index (2 at once) for tenant_id=acme`).
    waiting_reason: str | None = None
    #: A collapsed (debounced) dispatch: the job whose run serves it.
    served_by: str | None = None

    def __post_init__(self) -> None:
        # Held as the enum whatever an engine read back (Redis and Temporal store the string):
        # an unknown state fails here, where it is made, not in a caller comparing it.
        if type(self.state) is not JobState:
            object.__setattr__(self, "state", JobState(self.state))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

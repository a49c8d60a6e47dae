"""The one shape every engine has: what the dispatcher and the lifecycle functions may ask of
an engine, and exactly what crosses that boundary.

An engine (one subpackage each: `dramatiq`, `temporal`, `inline`, with the same file names)
implements `Engine`. Its `errors.py` maps its library's exceptions onto the ones below in one
context manager, keeping the cause; nothing above an engine sees redis or temporalio errors.

Crossing in: a `Submission` (validated job id, name, queue, encoded payload, options) or a job
id. Crossing out: the frozen results below, `JobStatus`, and the errors of this module and
`jobyard.dispatcher.errors`. Payloads and results are JSON data, never live objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from jobyard.dispatcher.errors import EngineUnavailable
from jobyard.dispatcher.models import NO_OPTIONS, DispatchOptions, EngineName, JobStatus
from jobyard.job_engine import JobyardError
from jobyard.job_engine.flow.waiting import Hold


class ClaimMode(StrEnum):
    """How sure the dispatcher is that no other engine holds the job it submits."""

    NONE = "none"  # sure: the other engine records the job as this one's, or never saw it
    BEST_EFFORT = "best_effort"  # nothing reached the other engine; claim it there if it answers
    STRICT = "strict"  # an enqueue may have landed there; wait for it to say who owns the job


@dataclass(frozen=True)
class Submission:
    """A validated job on its way to an engine."""

    job_id: str
    name: str
    queue: str
    payload: dict[str, Any]
    options: DispatchOptions = field(default_factory=DispatchOptions)
    fallback_reason: str | None = None  # why it is not on the preferred engine, if it is not
    claim: ClaimMode = ClaimMode.NONE
    #: Steps a job that started elsewhere has finished (name -> JSON result, sleeps' wake times
    #: included): the engine returns them instead of running those steps again.
    recorded_steps: dict[str, Any] | None = None
    #: The trace context the job was dispatched in, for an engine that takes it over later
    #: (None: the current one). See jobyard.job_engine.tracing.
    trace: dict[str, str] | None = None
    #: The payload's strict JSON text, when the dispatcher has it already (dispatch_many): an
    #: engine may carry it as it is instead of encoding the payload again.
    payload_json: bytes | None = None
    #: A flow-control limit refused the job at dispatch (docs/flow-control.md, "Fairness at
    #: dispatch"): an engine that can park it (Dramatiq) enqueues it waiting, shown with this
    #: hold, until its turn; any other engine ignores it (its run asks the limit itself).
    hold: Hold | None = None


class NewJob(NamedTuple):
    """A job `dispatch_many` validated with a generated id and no options, its payload as data
    and as its strict JSON text: cheaper to make than a Submission (a bulk dispatch makes one
    per job); an engine may send it from a template (see `Engine.submit_batch`).
    `submission()` is the same job for every other path (Temporal, the job log's record of
    one job)."""

    job_id: str
    name: str
    queue: str
    payload: dict[str, Any]
    payload_json: bytes
    priority: int = 0  # its job's declared priority (`@job(priority=)`)

    def submission(self) -> Submission:
        options = NO_OPTIONS if not self.priority else DispatchOptions(priority=self.priority)
        return Submission(
            self.job_id, self.name, self.queue, self.payload, options,
            payload_json=self.payload_json,
        )  # fmt: skip


def as_submission(job: Submission | NewJob) -> Submission:
    return job if isinstance(job, Submission) else job.submission()


class SubmitStatus(StrEnum):
    STARTED = "started"  # this engine took the job
    DUPLICATE = "duplicate"  # this engine already has a job with this id; nothing new started
    OWNED_ELSEWHERE = "owned_elsewhere"  # the id belongs to another engine (see `owner`)
    NO_WORKERS = "no_workers"  # nothing would run it here; the id is now the other engine's


@dataclass(frozen=True)
class Submitted:
    status: SubmitStatus
    owner: EngineName | None = None  # for OWNED_ELSEWHERE: which engine has the id


class ReleaseStatus(StrEnum):
    RELEASED = "released"  # the job is not this engine's (a waiting copy was removed)
    KEPT = "kept"  # this engine started the job: it stays here (see `state`)


@dataclass(frozen=True)
class Release:
    status: ReleaseStatus
    state: str | None = None


class CancelStatus(StrEnum):
    CANCELLED = "cancelled"  # it will never run (again)
    REQUESTED = "requested"  # it is running and stops at its next step boundary
    FINISHED = "finished"  # it had already finished (see `state`)
    NOT_HERE = "not_here"  # this engine has no such job


@dataclass(frozen=True)
class Cancellation:
    status: CancelStatus
    state: str | None = None


class ReplayStatus(StrEnum):
    REPLAYED = "replayed"
    ACTIVE = "active"  # queued, running or succeeded: replaying would run it twice
    NOT_HERE = "not_here"
    NEEDS_PAYLOAD = "needs_payload"  # the engine no longer has the payload: pass it in


@dataclass(frozen=True)
class Replay:
    status: ReplayStatus
    state: str | None = None
    name: str | None = None
    queue: str | None = None
    payload: Any = None  # what the replayed run got (for the job log)


@dataclass(frozen=True)
class QueueDepth:
    name: str
    waiting: int
    in_flight: int  # fetched by a worker, not finished
    delayed: int  # waiting for a retry backoff, a durable sleep or a dispatch delay
    live_workers: int
    held: int = 0  # waiting for a flow-control limit (a rate window, a slot, a debounce)


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str  # host:pid:random
    queues: list[str]
    last_seen: float  # unix seconds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EngineError(JobyardError):
    """What an engine's error mapping turns library errors into (besides EngineUnavailable)."""


class NotOnEngine(EngineError):
    """The engine has no job with this id."""


class AlreadyOnEngine(EngineError):
    """The engine already has a job with this id."""


class AlreadyClosed(EngineError):
    """The job is finished; it can no longer be changed."""


class Engine(ABC):
    """A place jobs run. Every method raises EngineUnavailable when the engine cannot be asked
    (its `ambiguous` says whether the request may have taken effect); nothing else escapes."""

    name: ClassVar[EngineName]

    @abstractmethod
    def submit(self, job: Submission) -> Submitted:
        """Start `job` once under its id; a second submit of the id starts nothing."""

    def submit_many(self, jobs: Iterable[Submission]) -> list[Submitted | EngineUnavailable]:
        """`submit` of each job, in order. A job the engine could not take gets its
        EngineUnavailable in its place: one job's failure is that job's, not the batch's. An
        engine that can take a batch in fewer round trips overrides this. `jobs` may be a
        generator: an engine may send the first jobs before the last are made."""
        results: list[Submitted | EngineUnavailable] = []
        for job in jobs:
            try:
                results.append(self.submit(job))
            except EngineUnavailable as exc:
                results.append(exc)
        return results

    def submit_batch(
        self, jobs: Iterable[Submission | NewJob]
    ) -> list[Submitted | EngineUnavailable]:
        """`submit_many` of `dispatch_many`'s jobs, among them NewJobs: each as its
        Submission. An engine that sends a NewJob for less overrides this."""
        return self.submit_many(as_submission(job) for job in jobs)

    @abstractmethod
    def release(self, job_id: str, name: str, queue: str) -> Release:
        """Make sure this engine will not run the job, unless it already started it."""

    @abstractmethod
    def status(self, job_id: str) -> JobStatus | None:
        """The job's state here, or None when this engine does not have it."""

    @abstractmethod
    def cancel(self, job_id: str) -> Cancellation: ...

    @abstractmethod
    def replay(self, job_id: str, payload: Any = None) -> Replay:
        """Run a failed, dead or cancelled job again under its id. `payload` is used when the
        engine no longer has it (it answered NEEDS_PAYLOAD)."""

    @abstractmethod
    def steps(self, job_id: str) -> dict[str, Any]:
        """Finished steps and their results, where the engine keeps them apart from its log."""

    @abstractmethod
    def queue_depths(self) -> list[QueueDepth]: ...

    @abstractmethod
    def workers(self) -> list[WorkerInfo]: ...

    def job_log_backlog(self) -> int:
        """Jobs whose changes have not reached the job log yet: none for an engine that writes
        it as they happen; an engine that ships them later (Dramatiq) counts them."""
        return 0


@dataclass(frozen=True)
class Orphan:
    """A job moved off a queue that has no live worker, waiting to be started elsewhere."""

    message: bytes  # as it sits on the handoff list, to remove it once started elsewhere
    job: Submission


@runtime_checkable
class RescueSource(Protocol):
    """What the rescue (jobyard.dispatcher.rescue) asks of the engine it moves jobs off: an
    engine whose queued jobs can outlive its workers, or its store (Dramatiq on Redis). The
    engine the jobs move to needs only `Engine`."""

    name: ClassVar[EngineName]

    def collect_orphans(self, fallback_reason: str) -> list[Orphan]:
        """Jobs of queues with no live worker, taken off them onto a handoff list."""

    def orphan_moved(self, orphan: Orphan) -> None:
        """Drop a job from the handoff list: it started elsewhere."""

    def heartbeat_expiries(self, lookback: float = 0.0) -> list[float]:
        """Seconds until each queue's last live worker, or a worker's held messages, is known
        dead (negative: expired in the last `lookback` seconds)."""

    def missing(self, job_ids: list[str]) -> list[str]:
        """Those of `job_ids` this engine has no record of (lost with its store)."""

    def restore_steps(self, job_id: str, steps: dict[str, str]) -> None:
        """Put back the step results (JSON text) of a lost job before `recover`."""

    def recover(self, job: Submission) -> Submitted:
        """Enqueue again a job its store lost, so that no stale copy of it runs."""

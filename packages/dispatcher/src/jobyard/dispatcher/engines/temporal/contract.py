"""The contract between the dispatcher and the generic workflow (apps/temporal_worker): its name,
its input, its queries. Imported by both sides and by the rescue; no temporalio import here, so
the workflow sandbox passes it through."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from jobyard.dispatcher.engines.base import ClaimMode, Submission
from jobyard.job_engine import crypto

WORKFLOW_NAME = "jobyard.job"
STATUS_QUERY = "status"

__all__ = ["STATUS_QUERY", "WORKFLOW_NAME", "ClaimMode", "JobRequest", "StatusReply"]

#: The activity that runs one ctx.run step (its input names the step): read by the timeline.
STEP_ACTIVITY = "jobyard.step"
#: The local activity through which a limited job's workflow takes, renews and ends its permits.
PERMIT_ACTIVITY = "jobyard.permit"
#: The signal that tells a workflow held by a limit to ask for its permits again now.
WAKE_SIGNAL = "jobyard.wake"


def step_task_queue(task_queue: str, queue: str) -> str:
    """The Temporal task queue of a jobyard queue's steps: workflows run on `task_queue`
    (TEMPORAL_TASK_QUEUE), each queue's steps on their own, polled by a Worker whose activity
    slots are the queue's concurrency (docs/flow-control.md "Per-queue concurrency")."""
    return f"{task_queue}.{queue}"


@dataclass(frozen=True)
class JobRequest:
    """The workflow's input. Histories written before this type existed hold the same fields as
    a plain dict, which the data converter reads into it."""

    job_id: str
    name: str
    queue: str
    payload: dict[str, Any]
    claim: ClaimMode = ClaimMode.NONE
    fallback_reason: str | None = None
    webhook_url: str | None = None
    retry: dict[str, Any] | None = None
    steps: dict[str, Any] | None = None  # finished on Dramatiq before the job moved here
    after: dict[str, Any] | None = None  # the jobs it runs after: {"ids", "on_failure"}

    @classmethod
    def of(cls, job: Submission) -> JobRequest:
        """A job that comes from Redis or the job log (the rescue) may carry its payload and
        steps sealed for its job id (jobyard.job_engine.crypto): they are opened here, and the
        payload codec (engines/temporal/codec.py) seals the whole request in Temporal."""
        steps = job.recorded_steps
        if steps:
            steps = {step: crypto.unseal(job.job_id, value) for step, value in steps.items()}
        return cls(
            job_id=job.job_id,
            name=job.name,
            queue=job.queue,
            payload=crypto.unseal(job.job_id, job.payload),
            claim=job.claim,
            fallback_reason=job.fallback_reason,
            webhook_url=job.options.webhook_url,
            retry=job.options.retry,
            steps=steps,
            after=job.options.after,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRequest:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        known["claim"] = ClaimMode(known.get("claim") or ClaimMode.NONE)
        return cls(**known)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StatusReply:
    """What the STATUS_QUERY answers while the workflow runs."""

    name: str | None
    state: str
    attempts: int
    progress: Any = None
    run_at: float | None = None  # unix seconds a durable sleep ends, or a held job asks again
    #: A job held by a flow-control limit: `throttled`, `waiting for slot`, `debouncing`.
    display_state: str | None = None
    waiting_reason: str | None = None  # the limit and key that hold it

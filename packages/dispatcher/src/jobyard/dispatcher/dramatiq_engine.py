"""The Dramatiq side of dispatch: one Lua call that checks liveness, dedupes and enqueues."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from jobyard.dispatcher.errors import EngineUnavailable
from jobyard.dispatcher.models import DispatchOptions, JobStatus
from jobyard.job_engine import JobSpec
from jobyard.queue.messages import encode_job_message
from jobyard.queue.store import JobStore

ENGINE = "dramatiq"


@dataclass(frozen=True)
class EnqueueOutcome:
    status: str  # enqueued | exists | no_workers
    engine: str | None = None


def translate(exc: redis.RedisError) -> EngineUnavailable:
    # Only a failure while connecting proves the command never reached Redis.
    ambiguous = isinstance(exc, redis.ConnectionError | redis.TimeoutError) and (
        "connecting" not in str(exc)
    )
    return EngineUnavailable(ENGINE, f"{type(exc).__name__}: {exc}", ambiguous=ambiguous)


def replay_options(options: DispatchOptions) -> dict[str, Any]:
    """What a replay of the job must dispatch with again (the delay was for the first run)."""
    kept = {"webhook_url": options.webhook_url, "retry": options.retry}
    return {key: value for key, value in kept.items() if value is not None}


class DramatiqEngine:
    def __init__(self, store: JobStore, heartbeat_timeout_ms: int) -> None:
        self.store = store
        self.heartbeat_timeout_ms = heartbeat_timeout_ms

    def submit(
        self,
        spec: JobSpec,
        job_id: str,
        payload: dict[str, Any],
        options: DispatchOptions,
    ) -> EnqueueOutcome:
        message = encode_job_message(
            spec.name, spec.queue, job_id, payload,
            delay_seconds=options.delay, webhook_url=options.webhook_url, retry=options.retry,
        )  # fmt: skip
        try:
            reply = self.store.enqueue(
                job_id,
                spec.name,
                spec.queue,
                message.queue,
                message.redis_message_id,
                message.data,
                self.heartbeat_timeout_ms,
                replay_options(options),
            )
        except redis.RedisError as exc:
            raise translate(exc) from None
        return EnqueueOutcome(reply[0], reply[1] if len(reply) > 1 else None)

    def handoff(self, job_id: str, name: str, queue: str) -> tuple[str, ...]:
        try:
            return self.store.handoff(job_id, name, queue)
        except redis.RedisError as exc:
            raise translate(exc) from None

    def status(self, job_id: str) -> JobStatus | None:
        """The job's record, or None when Redis does not know it as a Dramatiq job."""
        try:
            record = self.store.get(job_id)
        except redis.RedisError as exc:
            raise translate(exc) from None
        if record is None or record.get("engine") != ENGINE:
            return None
        state = record.get("state", "queued")
        result = json.loads(record["result"]) if record.get("result") else None
        progress = json.loads(record["progress"]) if record.get("progress") else None
        return JobStatus(
            job_id=job_id,
            engine=ENGINE,
            state=state,
            attempts=int(record.get("attempts", 0)),
            name=record.get("name"),
            result=result if state == "succeeded" else None,
            error=record.get("error") or None,
            progress=progress,
        )

"""The claim: the one thing the Temporal worker asks of Dramatiq's Redis (the Lua `handoff`: mark
the job Temporal's, removing a queued Dramatiq message in the same step). Besides the retry
policy (context.py, moving to job_engine) this module is the Temporal worker's only import of
jobyard.queue; the worker builds one ClaimStore and gives it to
its activities (activities.py), so a claim costs one Lua call on a plain Redis client, not a
whole Dispatcher (a second Temporal client, a breaker, a dispatcher's store)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import redis

from jobyard.queue.client import get_client
from jobyard.queue.store import JobStore


@dataclass(frozen=True)
class Claim:
    claimed: bool  # the job is now Temporal's
    state: str | None = None  # not claimed: the state Dramatiq already has it in


class ClaimUnavailable(Exception):
    """Redis did not answer the claim (down, refusing, timed out): retry it later."""


class ClaimStore(Protocol):
    def claim(self, job_id: str, name: str, queue: str) -> Claim: ...


class RedisClaims:
    """ClaimStore on jobyard.queue's JobStore (REDIS_URL, the process's shared client)."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    @classmethod
    def from_env(cls) -> RedisClaims:
        return cls(JobStore(get_client()))

    def claim(self, job_id: str, name: str, queue: str) -> Claim:
        try:
            reply = self._store.handoff(job_id, name, queue)
        except redis.RedisError as exc:
            raise ClaimUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if reply.status == "claimed":
            return Claim(True)
        return Claim(False, reply.detail)

"""Why a held job waits: the permit-store scope a limit counts in, and the `display_state` and
`waiting_reason` that get_job, the API, the SSE stream and the dashboard show for it.

A held job's engine state stays `queued` (it has not started: no attempt is spent); these
fields say which limit holds it and for which key.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobyard.job_engine.flow.declarations import Concurrency, Debounce, KeyedRateLimit
from jobyard.job_engine.flow.limiter import CONCURRENCY, DEBOUNCE, RATE
from jobyard.job_engine.policy import RateLimit

#: display_state of a job waiting for its rate limit's window.
THROTTLED = "throttled"
#: display_state of a job waiting for a concurrency slot of its key.
WAITING_FOR_SLOT = "waiting for slot"
#: display_state of a debounced run waiting for its burst to go quiet.
DEBOUNCING = "debouncing"
#: display_state of a dispatch collapsed into another job's run (its `served_by`).
COLLAPSED = "collapsed"
DISPLAY_STATES = (THROTTLED, WAITING_FOR_SLOT, DEBOUNCING, COLLAPSED)

#: What declares the limit: a job (`@job(...)`) or a queue (`queue(...)`).
JOB, QUEUE = "job", "queue"

_DISPLAY = {RATE: THROTTLED, CONCURRENCY: WAITING_FOR_SLOT, DEBOUNCE: DEBOUNCING}


def scope(kind: str, owner_kind: str, owner: str) -> str:
    """The permit store's name of one declared limit: `rate:job:ai.summarise`,
    `concurrency:queue:documents`, `debounce:job:search.reindex`."""
    if kind not in _DISPLAY or owner_kind not in (JOB, QUEUE):
        raise ValueError(f"unknown limit {kind!r} of a {owner_kind!r}")
    return f"{kind}:{owner_kind}:{owner}"


def owner_of(scope_name: str) -> tuple[str, str]:
    """What a `scope` name's limit is declared on: (QUEUE, "documents"), (JOB, "ai.summarise")."""
    _kind, owner_kind, owner = scope_name.split(":", 2)
    return owner_kind, owner


def describe(limit: KeyedRateLimit | RateLimit | Concurrency | Debounce) -> str:
    """`60 starts per 60s`, `2 at once`, `debounce 5s (max 60s)`."""
    if isinstance(limit, RateLimit):
        return f"{limit.calls} starts per {limit.period:g}s"
    if isinstance(limit, Concurrency):
        return f"{limit.limit} at once"
    cap = f" (max {limit.max_wait:g}s)" if limit.max_wait is not None else ""
    return f"debounce {limit.period:g}s{cap}"


@dataclass(frozen=True)
class Hold:
    """A job held by one limit: what the job's record shows while it waits."""

    kind: str  # RATE | CONCURRENCY | DEBOUNCE
    scope: str
    limit: str  # describe(limit)
    key_path: str | None
    key: str
    until: float | None = None  # epoch seconds it asks again (a wake-up may come sooner)

    @property
    def display_state(self) -> str:
        return _DISPLAY[self.kind]

    @property
    def waiting_reason(self) -> str:
        """`rate limit rate:job:ai.summarise (60 starts per 60s) for tenant_id=acme`."""
        reason = f"{self.kind} limit {self.scope} ({self.limit})"
        if self.key_path is not None:
            reason += f" for {self.key_path}={self.key}"
        return reason

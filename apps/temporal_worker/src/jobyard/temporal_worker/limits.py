"""The workflow's side of flow control (docs/flow-control.md): a limited job's run asks for its
permits before its handler runs, waits in a timer while refused, keeps its leases alive while it
runs, and ends them when it ends. Every call is the local activity `jobyard.permit`
(permits.py), so it costs no task round trip and no activity slot.

Waiting: refused, the workflow records why (the status query's `display_state` and
`waiting_reason`, and a `queued` event for the job log) and waits for `retry_in` seconds or for
the `jobyard.wake` signal a release sends, whichever comes first. It holds nothing meanwhile.

Leases: a lease lives WORKER_HEARTBEAT_TIMEOUT (`ttl`) unrenewed. The workflow renews it every
third of that while the handler runs (a timer and a local activity; nothing for a job done
sooner), and a durable sleep extends it to its end first, so a sleeping job holds its slot
without a renewal per third of a ttl. A workflow nobody runs (every Temporal worker down)
renews nothing and its slots come back within the ttl, as a dead Dramatiq worker's do. The
workflow renews, not a worker process's LeaseRenewer: a workflow's tasks may move to another
process, and a process that kept renewing a run released elsewhere would take its slot back."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy as TemporalRetryPolicy

with workflow.unsafe.imports_passed_through():
    from jobyard.dispatcher.engines.temporal.contract import PERMIT_ACTIVITY

PERMIT_TIMEOUT = timedelta(seconds=30)
#: The database away: ask again, never run unlimited; at most this long between tries.
PERMIT_RETRY = TemporalRetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=["MissingKeyError", "InvalidPayloadError"],
)  # fmt: skip
#: Temporal rejects a zero timer.
MIN_WAIT = 0.01


@dataclass
class Lease:
    held: list[dict[str, Any]]  # HeldSlot fields
    ttl: float
    renew_at: float  # workflow time (unix seconds) of the next renewal


class RunLimits:
    """One run's permits, driven by JobWorkflow."""

    def __init__(self, job_id: str, name: str) -> None:
        self.job_id, self.name = job_id, name
        self.hold: dict[str, Any] | None = None  # the last refusal, while it holds the run
        self.lease: Lease | None = None
        #: When the permits were granted: the database's clock, the one every limit counts on
        #: (a rate limit's windows are over these instants), unix seconds.
        self.granted_at = 0.0
        self._woken = False
        self._waiting_in: dict[str, Any] | None = None
        self._renewing: asyncio.Task[None] | None = None
        #: One renewal or release at a time: a renewal committed after the release would take
        #: the slot back (a renewal re-takes a free slot), and a short one after a sleep's long
        #: one would cut the sleep's lease short.
        self._one_at_a_time = asyncio.Lock()

    def wake(self) -> None:
        self._woken = True

    async def admit(self, payload: Any, on_hold: Any) -> Any:
        """Wait until every limit takes the run; the payload to run with (a debounced run's
        burst's last one). `on_hold(reply)` is awaited when the reason it waits changes."""
        shown: tuple[str, str] | None = None
        while True:
            self._woken = False
            reply = await _permit({"op": "acquire", "job_id": self.job_id, "name": self.name,
                                   "payload": payload})  # fmt: skip
            if reply["granted"]:
                self.hold, self._waiting_in = None, None
                self.granted_at = float(reply["at"])
                if reply["held"]:
                    now = workflow.now().timestamp()
                    ttl = float(reply["ttl"])
                    self.lease = Lease(reply["held"], ttl, now + ttl / 3)
                    self._renewing = asyncio.create_task(self._keep_lease())
                debounced = reply.get("payload")
                return payload if debounced is None else debounced
            self.hold, self._waiting_in = reply, reply.get("waiting_in")
            reason = (reply["display_state"], reply["waiting_reason"])
            if reason != shown:
                shown = reason
                await on_hold(reply)
            with contextlib.suppress(TimeoutError):  # its time to ask again came
                await workflow.wait_condition(
                    lambda: self._woken,
                    timeout=timedelta(seconds=max(float(reply["retry_in"]), MIN_WAIT)),
                )

    async def extend(self, seconds: float) -> None:
        """Before a durable sleep of `seconds`: the leases last until its end plus a ttl."""
        lease = self.lease
        if lease is None or seconds < lease.ttl / 3:
            return  # the renewals cover it
        now = workflow.now().timestamp()
        lease.renew_at = max(lease.renew_at, now + seconds + lease.ttl / 3)
        await self._renew(seconds + lease.ttl)

    async def release(self) -> None:
        """End the run's leases (or its place among a limit's waiters, if it never got in);
        the release signals the waiters now due a slot."""
        held = self.lease.held if self.lease else [self._waiting_in] if self._waiting_in else []
        self.lease, self._waiting_in = None, None
        async with self._one_at_a_time:  # a renewal under way ends first
            if self._renewing is not None:  # now asleep, or waiting for this lock
                self._renewing.cancel()
                self._renewing = None
            if held:
                await _permit({"op": "release", "job_id": self.job_id, "held": held})

    async def _keep_lease(self) -> None:
        while (lease := self.lease) is not None:
            wait = lease.renew_at - workflow.now().timestamp()
            if wait > 0:
                await workflow.sleep(timedelta(seconds=max(wait, MIN_WAIT)))
                continue  # a sleep may have moved renew_at meanwhile
            lease.renew_at = workflow.now().timestamp() + lease.ttl / 3
            await self._renew(lease.ttl)

    async def _renew(self, ttl: float) -> None:
        async with self._one_at_a_time:
            lease = self.lease
            if lease is None:  # released meanwhile
                return
            reply = await _permit({"op": "renew", "job_id": self.job_id, "held": lease.held,
                                   "ttl": ttl})  # fmt: skip
        for slot in reply["lost"]:  # another run holds it now: say so, the run goes on
            workflow.logger.warning("job %s lost its slot in %s/%s (unrenewed past its ttl)",
                                    self.job_id, slot["scope"], slot["bucket"])  # fmt: skip


async def _permit(request: dict[str, Any]) -> dict[str, Any]:
    reply: dict[str, Any] = await workflow.execute_local_activity(
        PERMIT_ACTIVITY, request, start_to_close_timeout=PERMIT_TIMEOUT, retry_policy=PERMIT_RETRY
    )
    return reply

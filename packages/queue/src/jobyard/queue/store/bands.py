"""JobStore's commands of priorities' bands (docs/flow-control.md "Priorities"): a worker's
fetch, its requeue of messages it fetched and did not run, and a delayed message's hand-back
to its queue. Each puts a message where its job's priority says; priority 0 is Dramatiq's
queue list, as without priorities."""

from __future__ import annotations

from collections.abc import Sequence

from jobyard.job_engine import registry
from jobyard.queue import keys
from jobyard.queue.store.script import ScriptStore


def may_park(queue: str) -> bool:
    """Whether a job of `queue` is under a flow-control limit, so that its messages may be
    parked (jobyard:parked:<queue>): a fetch of any other queue does not look there."""
    parks = _parks.get(queue)
    if parks is None:
        parks = _parks[queue] = any(spec.limited and spec.queue == queue for spec in registry)
    return parks


_parks: dict[str, bool] = {}


class BandCommands(ScriptStore):
    def fetch(self, broker_id: str, queue: str, timestamp_ms: int, wanted: int) -> list[bytes]:
        """Up to `wanted` messages of `queue` for broker `broker_id`, in the order to run them
        (bands p > 0 highest first, the queue's list, bands p < 0), moved into its acks set;
        its Dramatiq heartbeat is `timestamp_ms` (Dramatiq's fetch does both). Parked messages
        now due (flow control) enter their lists first, on a queue whose jobs may be parked."""
        fetch_keys = [
            keys.dramatiq_heartbeats(),
            keys.dramatiq_acks(broker_id, queue),
            keys.dramatiq_queue(queue),
            keys.dramatiq_messages(queue),
            keys.bands(queue),
        ]
        if may_park(queue):
            fetch_keys += [keys.parked(queue), keys.priority_channel(queue)]
        reply = self._call(
            fetch_keys,
            "fetch",
            broker_id,
            timestamp_ms,
            wanted,
            keys.band_prefix(queue),
            keys.job_prefix(),
        )
        return list(reply)

    def wake(self, queue: str, job_ids: Sequence[str]) -> int:
        """The parked messages of `job_ids` (jobs a flow-control slot was released for) enter
        their lists now, instead of at their parked time; how many were parked."""
        return self.wake_here(queue, job_ids)[0]

    def wake_here(self, queue: str, job_ids: Sequence[str]) -> tuple[int, list[str]]:
        """`wake`, and the ids Dramatiq does not run (no record here, or handed to Temporal):
        the waiters to wake on the other engine."""
        if not job_ids:
            return 0, []
        reply = self._call(
            [
                keys.parked(queue),
                keys.dramatiq_queue(queue),
                keys.dramatiq_messages(queue),
                keys.bands(queue),
                keys.priority_channel(queue),
            ],
            "wake",
            keys.job_prefix(),
            keys.band_prefix(queue),
            *job_ids,
        )
        woken, *elsewhere = reply
        return int(woken), [i.decode() if isinstance(i, bytes) else str(i) for i in elsewhere]

    def requeue(
        self, broker_id: str, queue: str, message_ids: Sequence[str], *, in_order: bool = False
    ) -> int:
        """Puts back messages broker `broker_id` fetched and did not run, each where it waited:
        priority 0 at the back of the queue's list (Dramatiq's requeue), or, `in_order`, at its
        front, so that fetching again gives the same order (bands always keep it)."""
        if not message_ids:
            return 0
        reply = self._call(
            [
                keys.dramatiq_acks(broker_id, queue),
                keys.dramatiq_queue(queue),
                keys.dramatiq_messages(queue),
                keys.bands(queue),
            ],
            "requeue",
            keys.job_prefix(),
            keys.band_prefix(queue),
            "first" if in_order else "last",
            *message_ids,
        )
        return int(reply)

    def hand_back(self, queue: str, message_id: str, data: bytes) -> int:
        """A delayed message come due enters `queue`, in its job's band; the job's priority."""
        reply = self._call(
            [keys.dramatiq_queue(queue), keys.dramatiq_messages(queue), keys.bands(queue)],
            "hand_back",
            keys.job_prefix(),
            keys.band_prefix(queue),
            keys.priority_channel(queue),
            message_id,
            data,
        )
        return int(reply)

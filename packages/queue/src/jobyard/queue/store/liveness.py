"""JobStore's commands of worker liveness: heartbeats, leases, Redis's clock, and the messages
of dead worker processes taken back (jobyard.queue.reclaim)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from jobyard.queue import keys
from jobyard.queue.store.script import ScriptStore, _text


class LivenessCommands(ScriptStore):
    def heartbeat(self, worker_id: str, broker_id: str, queues: list[str]) -> int:
        worker_keys = [keys.workers(q) for q in queues]
        return int(
            self._call(
                [keys.dramatiq_heartbeats(), *worker_keys], "heartbeat", worker_id, broker_id
            )
        )

    def deregister(self, worker_id: str, queues: list[str]) -> None:
        self._call([keys.workers(q) for q in queues], "deregister", worker_id)

    def live_workers(self, queue: str, heartbeat_timeout_ms: int) -> int:
        return int(self._call([keys.workers(queue)], "live_workers", heartbeat_timeout_ms))

    def take_lease(self, name: str, holder: str, ms: int) -> bool:
        """Take or extend the lease `name` for `holder`; False while someone else holds it."""
        return bool(self._call([name], "lease", holder, ms))

    def now(self) -> float:
        """Redis's clock, in unix seconds: the clock heartbeats are scored on."""
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    def heartbeats_since(self, queue: str, since: float) -> list[tuple[str, float]]:
        """(worker id, last heartbeat in unix seconds) of `queue`'s workers seen since `since`."""
        seen = self.client.zrangebyscore(keys.workers(queue), since * 1000, "+inf", withscores=True)
        return [(_text(member), float(score) / 1000) for member, score in cast(Any, seen)]

    def broker_heartbeats_since(self, since: float) -> list[float]:
        """Last beats (unix seconds) of the Dramatiq brokers seen since `since`: Dramatiq's own
        heartbeats, which its consumers refresh on every fetch."""
        seen = self.client.zrangebyscore(
            keys.dramatiq_heartbeats(), since * 1000, "+inf", withscores=True
        )
        return [float(score) / 1000 for _, score in cast(Any, seen)]

    def reclaim(
        self,
        queue: str,
        *,
        dead_before_ms: int = 0,
        stale_beat: str = "",
        dead: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Takes back the messages of `queue` (and its delay queue) held by dead Dramatiq
        brokers: those whose heartbeat is older than `dead_before_ms` (0: none; `stale_beat`
        says how they died), and `dead`, (broker id, how its process died) pairs. Live jobs'
        messages go to the suspects list (see `requeue_suspects`); returns how many."""
        delay_queue = keys.delayed(queue)
        reply = self._call(
            [
                keys.dramatiq_heartbeats(),
                *self._queue_keys(queue),
                keys.suspects(queue),
                keys.bands(queue),
                keys.band_prefix(queue),
                keys.priority_channel(queue),
            ],
            "reclaim",
            keys.dramatiq_acks_prefix(),
            queue,
            delay_queue,
            keys.job_prefix(),
            dead_before_ms,
            stale_beat,
            *[value for pair in dead for value in pair],
        )
        return int(reply)

    def suspects(self, queue: str) -> list[tuple[str, bytes | str | None]]:
        """The messages on `queue`'s suspects list: (message id, its data; None if gone)."""
        ids = [_text(i) for i in self.client.lrange(keys.suspects(queue), 0, -1)]
        if not ids:
            return []
        data = self.client.hmget(keys.dramatiq_messages(queue), ids)
        return list(zip(ids, data, strict=True))

    def requeue_suspects(self, queue: str, marked: Sequence[tuple[str, bytes]]) -> int:
        """Puts suspects' messages, (id, data marked as a suspect's), back on `queue`."""
        if not marked:
            return 0
        reply = self._call(
            [
                keys.suspects(queue),
                keys.dramatiq_queue(queue),
                keys.dramatiq_messages(queue),
                keys.bands(queue),
                keys.band_prefix(queue),
                keys.job_prefix(),
                keys.priority_channel(queue),
            ],
            "requeue_suspects",
            *[value for pair in marked for value in pair],
        )
        return int(reply)

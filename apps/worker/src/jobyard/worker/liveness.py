"""Per-queue worker heartbeats, and the sweep that returns a dead worker's messages to its queue."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from dramatiq.brokers.redis import RedisBroker

from jobyard.queue.broker import requeue_from_dead_workers
from jobyard.queue.store import JobStore

log = logging.getLogger("jobyard.worker")

#: Run Dramatiq's dead-worker maintenance every this many heartbeats.
MAINTENANCE_EVERY = 3


def new_worker_id(token: str | None = None) -> str:
    """`host:pid:token` (a random token if none is given); `jobyard health` finds its own
    container's workers by the host part."""
    return worker_id_of(socket.gethostname(), os.getpid(), token or new_worker_token())


def worker_id_of(host: str, pid: int, token: str) -> str:
    return f"{host}:{pid}:{token}"


def new_worker_token() -> str:
    return uuid.uuid4().hex[:8]


#: Seconds between attempts while beats fail (each also bounded by the Redis timeout).
RETRY_FAILED_BEAT = 0.2
#: At most this long to let a beat in flight end before deregistering.
STOP_JOIN_SECONDS = 5.0


class Heartbeat(threading.Thread):
    """Beats for every (broker, queue) of this process while `healthy()` says the process works,
    then calls `each_beat`, the process's own periodic work."""

    def __init__(
        self,
        store: JobStore,
        brokers: dict[str, RedisBroker],
        worker_id: str,
        interval: float,
        healthy: Callable[[], bool],
        each_beat: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="jobyard-heartbeat", daemon=True)
        self.store = store
        self.brokers = brokers
        self.worker_id = worker_id
        self.interval = interval
        self.healthy = healthy
        self.each_beat = each_beat
        self.stopped = threading.Event()

    def beat(self, healthy: bool = True) -> None:
        """A stuck process keeps Dramatiq's own beat (its messages must not be handed to a peer
        while its threads may still run them) but drops out of the per-queue liveness that
        dispatch and `jobyard health` read."""
        for queue, broker in self.brokers.items():
            self.store.heartbeat(self.worker_id, broker.broker_id, [queue] if healthy else [])

    def run(self) -> None:
        beats = 0
        failing = False
        while not self.stopped.is_set():
            try:
                healthy = self.healthy()
                self.beat(healthy)
                if self.each_beat is not None:
                    self.each_beat()
                if not healthy:
                    log.error("worker %s is stuck; withholding its queue heartbeat", self.worker_id)
                beats += 1
                if beats % MAINTENANCE_EVERY == 0:
                    for queue, broker in self.brokers.items():
                        requeue_from_dead_workers(broker, queue, self.store)
            except Exception as exc:  # Redis down: keep trying, the dispatcher falls back meanwhile
                if not failing:
                    log.warning("heartbeat failed: %s; retrying until Redis answers", exc)
                failing = True
                # Beat again as soon as Redis answers, not an interval later: after a pause
                # every beat is old, and a peer's sweep would take a late one's messages for a
                # dead worker's and run them twice (seen once in `make chaos`, Redis SIGSTOP 6s).
                self.stopped.wait(min(self.interval, RETRY_FAILED_BEAT))
                continue
            if failing:
                log.warning("heartbeat works again")
                failing = False
            self.stopped.wait(self.interval)

    def stop_and_deregister(self) -> None:
        self.stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            # A beat in flight would register the worker again after the deregistration.
            self.join(timeout=STOP_JOIN_SECONDS)
        try:
            self.store.deregister(self.worker_id, list(self.brokers))
        except Exception as exc:
            log.warning("could not deregister worker %s: %s", self.worker_id, exc)

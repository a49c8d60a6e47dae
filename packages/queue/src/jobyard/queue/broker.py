"""Dramatiq brokers for jobyard: one per queue, its actors derived from the job registry."""

from __future__ import annotations

from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, TimeLimit

from jobyard.job_engine import env, registry, tracing
from jobyard.job_engine.queues import get_queue
from jobyard.queue import keys
from jobyard.queue.client import get_client
from jobyard.queue.direct import DirectJobStore
from jobyard.queue.dramatiq_compat import JobyardBroker
from jobyard.queue.reclaim import sweep_dead_workers
from jobyard.queue.runner import TIME_LIMIT_BACKSTOP, JobRunner
from jobyard.queue.store import JobStore

__all__ = ["DeadWorkerSweeper", "JobyardBroker", "build_broker", "requeue_from_dead_workers"]


def heartbeat_timeout_ms() -> int:
    return int(env.get_float(env.WORKER_HEARTBEAT_TIMEOUT) * 1000)


def build_broker(
    queue: str, *, store: JobStore | None = None, broker_id: str | None = None
) -> RedisBroker:
    """A broker for `queue` with one actor per job declared on it. `broker_id`: see
    dramatiq_compat.broker_id_of (a worker process's brokers are named after it).

    Of Dramatiq's default middleware only TimeLimit stays (the backstop for handler code outside
    steps): jobyard retries and sleeps through JobRunner, which records them (no Retries), its
    messages carry no max_age (AgeLimit would check each one for nothing), and it has no use for
    Callbacks, Pipelines or ShutdownNotifications. Every middleware costs each message a call
    per signal (process, ack).

    Dramatiq's own maintenance is off (`maintenance_chance=0`): it would put a dead process's
    messages back unmarked, by chance; jobyard's sweeps do it (jobyard.queue.reclaim).
    """
    client = get_client(timeout=env.get_float(env.WORKER_REDIS_TIMEOUT))
    middleware: list[Any] = [TimeLimit(), CurrentMessage()]
    if tracing.setup_from_env():
        from jobyard.queue.tracing import TracingMiddleware

        middleware.append(TracingMiddleware())
    broker = JobyardBroker(
        client=client,
        namespace=keys.DRAMATIQ_NAMESPACE,
        heartbeat_timeout=heartbeat_timeout_ms(),
        middleware=middleware,
        maintenance_chance=0,
        broker_id=broker_id,
    )
    store = store or DirectJobStore(client)
    get_queue(queue)  # an unknown queue fails here, even one with no jobs declared
    for spec in registry:
        if spec.queue != queue:
            continue
        runner = JobRunner(store, spec, broker.broker_id)
        limit_ms = int((runner.time_limit + TIME_LIMIT_BACKSTOP) * 1000)
        dramatiq.Actor(
            runner,
            broker=broker,
            actor_name=spec.name,
            queue_name=queue,
            priority=0,
            options={"max_retries": 0, "time_limit": limit_ms},
        )
    broker.declare_queue(queue)
    return broker


def requeue_from_dead_workers(broker: RedisBroker, queue: str, store: JobStore) -> None:
    """Requeue messages held by workers whose Dramatiq heartbeat expired, now, not by chance;
    live jobs' messages as suspects (see jobyard.queue.reclaim)."""
    sweep_dead_workers(store, broker, queue)


class DeadWorkerSweeper:
    """Runs requeue_from_dead_workers from a process that has no worker (the rescue): one
    broker for the sweeper's life, so its own Dramatiq heartbeat id stays the same."""

    def __init__(self, client: redis.Redis) -> None:
        self.store = JobStore(client)
        self.broker = RedisBroker(
            client=client,
            namespace=keys.DRAMATIQ_NAMESPACE,
            heartbeat_timeout=heartbeat_timeout_ms(),
        )

    def sweep(self, queues: list[str]) -> None:
        for queue in queues:
            requeue_from_dead_workers(self.broker, queue, self.store)

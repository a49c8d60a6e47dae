"""Dramatiq brokers for jobyard: one per queue, its actors derived from the job registry."""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
import redis
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import CurrentMessage, Middleware, MiddlewareError, TimeLimit

from jobyard.job_engine import env, registry, tracing
from jobyard.queue import keys
from jobyard.queue.client import get_client
from jobyard.queue.direct import DirectJobStore
from jobyard.queue.queues import get_queue
from jobyard.queue.runner import ACKED, TIME_LIMIT_BACKSTOP, JobRunner
from jobyard.queue.store import JobStore, _text


class JobyardConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, with two changes:

    - it skips the ack round trip for messages a jobyard Lua call has already acked;
    - it refills its prefetch window in batches, once half of it is free, and waits for that
      on the acks. Dramatiq's consumer fetches whatever is free, often one message per round
      trip, and when the window is full sleeps with a growing backoff (5, 10, 20 ms...) in
      which a busy worker's threads run dry.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.slot_freed = threading.Event()
        # The broker's set for this queue, the same object for the broker's life: looked up once
        # here rather than under the broker's lock twice a message.
        self.delivered = self.broker.delivered(self.queue_name)

    def window_full(self) -> bool:
        return bool(self.outstanding_message_count > self.prefetch // 2)

    def __next__(self) -> Any:
        if not self.message_cache and self.window_full():
            self.slot_freed.clear()  # then look again, so an ack in between is not missed
            if self.window_full() and not self.slot_freed.wait(self.timeout / 1000):
                return None  # still full: the consumer thread calls again
        message = super().__next__()  # type: ignore[no-untyped-call]
        if message is not None:
            self.delivered.add(message.options["redis_message_id"])
        return message

    def take_cached(self) -> MessageProxy | None:
        """A fetched message, if one is waiting, without the lock `__next__` needs: list.pop is
        atomic, so each message goes to one caller."""
        try:
            data = self.message_cache.pop(0)
        except IndexError:
            return None
        if data is None:  # see Dramatiq's __next__ (its issue 266)
            return None
        message = Message.decode(data)
        self.queued_message_ids.add(message.message_id)
        self.delivered.add(message.options["redis_message_id"])
        return MessageProxy(message)

    def take_all_cached(self) -> list[MessageProxy]:
        """Every fetched message still waiting (to put back): each goes to one caller, as with
        `take_cached`, but is not marked handed on."""
        taken: list[MessageProxy] = []
        while True:
            try:
                data = self.message_cache.pop(0)
            except IndexError:
                return taken
            if data is not None:
                taken.append(MessageProxy(Message.decode(data)))

    def _settled(self, message: Any) -> None:
        """Called from worker threads as each message is done."""
        self.delivered.discard(message.options.get("redis_message_id"))
        self.queued_message_ids.discard(message.message_id)
        # Event.set takes a lock even when set; a waiter clears it before it looks again.
        if not self.slot_freed.is_set() and not self.window_full():
            self.slot_freed.set()

    def ack(self, message: Any) -> None:
        try:
            if not getattr(message, ACKED, False):
                super().ack(message)  # type: ignore[no-untyped-call]
        finally:
            self._settled(message)

    def nack(self, message: Any) -> None:
        """A jobyard message fails only when Redis failed under the runner's own bookkeeping:
        put it back on the queue (seq makes a rerun safe) instead of Dramatiq's dead letters."""
        try:
            self.broker.do_requeue(self.queue_name, message.options["redis_message_id"])
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from exc
        finally:
            self._settled(message)


class JobyardBroker(RedisBroker):
    """Tracks which of its fetched messages it handed on (to the work or delay queue), so that
    a consumer starting after a lost connection can put back the rest: ids a fetch moved into
    this broker's ack set while its reply was lost, or a prefetched batch that could not be
    returned. Dramatiq leaves those in a live worker's ack set, where nothing sweeps them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._hooks: dict[str, list[Any]] = {}
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._delivered: dict[str, set[str]] = {}
        self._delivered_lock = threading.Lock()

    def add_middleware(self, middleware: Middleware, **kwargs: Any) -> None:
        super().add_middleware(middleware, **kwargs)
        self._hooks = {}

    def hooks(self, name: str) -> list[Any]:
        """The middleware methods called `name` that do something (not Middleware's no-op), in
        the order Dramatiq calls them. Dramatiq looks every one up by name, and calls the no-ops,
        for each signal of each message: about 10 us of a short job."""
        hooks = self._hooks.get(name)
        if hooks is None:
            ordered = self.middleware if name.startswith("before_") else self.middleware[::-1]
            noop = getattr(Middleware, name, None)
            hooks = self._hooks[name] = [
                getattr(m, name) for m in ordered if getattr(type(m), name, noop) is not noop
            ]
        return hooks

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        for hook in self.hooks("before_" + signal):
            try:
                hook(self, *args, **kwargs)
            except MiddlewareError:  # SkipMessage among them: Dramatiq's worker handles it
                raise
            except Exception:
                self.logger.critical("Unexpected failure in %s.", hook, exc_info=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        for hook in self.hooks("after_" + signal):
            try:
                hook(self, *args, **kwargs)
            except Exception:
                self.logger.critical("Unexpected failure in %s.", hook, exc_info=True)

    def delivered(self, queue_name: str) -> set[str]:
        with self._delivered_lock:
            return self._delivered.setdefault(queue_name, set())

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        self.requeue_undelivered(queue_name)
        return super().consume(queue_name, prefetch, timeout)

    def requeue_undelivered(self, queue_name: str) -> None:
        handed_on = set(self.delivered(queue_name))  # before reading the acks: see requeue
        try:
            held = self.client.smembers(keys.dramatiq_acks(self.broker_id, queue_name))
            stranded = [i for i in (_text(m) for m in held) if i not in handed_on]
            if stranded:
                # Dramatiq's requeue moves only ids still in the ack set: one acked meanwhile
                # stays acked.
                self.do_requeue(queue_name, *stranded)
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from exc

    @property
    def consumer_class(self) -> type[JobyardConsumer]:
        return JobyardConsumer


def heartbeat_timeout_ms() -> int:
    return int(env.get_float(env.WORKER_HEARTBEAT_TIMEOUT) * 1000)


def build_broker(queue: str, *, store: JobStore | None = None) -> RedisBroker:
    """A broker for `queue` with one actor per job declared on it.

    Of Dramatiq's default middleware only TimeLimit stays (the backstop for handler code outside
    steps): jobyard retries and sleeps through JobRunner, which records them (no Retries), its
    messages carry no max_age (AgeLimit would check each one for nothing), and it has no use for
    Callbacks, Pipelines or ShutdownNotifications. Every middleware costs each message a call
    per signal (process, ack).
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


def requeue_from_dead_workers(broker: RedisBroker, queue: str) -> None:
    """Requeue messages held by workers whose Dramatiq heartbeat expired, now, not by chance."""
    for name in (queue, keys.delayed(queue)):
        broker.scripts["dispatch"](
            keys=[broker.namespace],
            args=[
                "qsize",
                int(time.time() * 1000),
                name,
                broker.broker_id,
                broker.heartbeat_timeout,
                broker.dead_message_ttl,
                1,
                broker._max_unpack_size(),
            ],
        )


class DeadWorkerSweeper:
    """Runs requeue_from_dead_workers from a process that has no worker (the rescue): one
    broker for the sweeper's life, so its own Dramatiq heartbeat id stays the same."""

    def __init__(self, client: redis.Redis) -> None:
        self.broker = RedisBroker(
            client=client,
            namespace=keys.DRAMATIQ_NAMESPACE,
            heartbeat_timeout=heartbeat_timeout_ms(),
        )

    def sweep(self, queues: list[str]) -> None:
        for queue in queues:
            requeue_from_dead_workers(self.broker, queue)

"""The fence around Dramatiq's internals: every override of a Dramatiq class, and every use of a
name Dramatiq does not promise to keep, is in this module and nowhere else.

Written for Dramatiq 2.2 (the pyprojects declare `dramatiq[redis]>=2.2,<2.3`). A Dramatiq
release that renames or reshapes any member below would leave an override silently uncalled:
tests/test_dramatiq_fence.py compares the installed Dramatiq with `OVERRIDDEN`, `RELIED_ON`,
`CALLERS` and `DISPATCH_LUA` (`check_installed_dramatiq`) and fails on any difference.

Overrides, and why (the classes are below):

- `_RedisConsumer` (underscore-private) as `JobyardConsumer`: `__init__`, `__next__`, `ack`,
  `nack`. Skips the ack round trip for messages a jobyard Lua call already acked, refills its
  prefetch window in batches once half of it is free (Dramatiq's fetches whatever is free, often
  one message a round trip, then sleeps with a growing backoff), and turns a nack into a requeue
  (a jobyard message fails only when Redis failed under the runner's bookkeeping; the job's seq
  makes a rerun safe). Its `__next__` is Dramatiq's, but the idle backoff after an empty fetch
  is a wait that `nudge` ends (a job parked by flow control was woken: it is fetched at once,
  not after up to `timeout`). Reads the consumer's `message_cache`, `queued_message_ids`,
  `outstanding_message_count`, `prefetch`, `timeout` and `misses`, and calls its `requeue`.
- `MessageProxy` as `FieldsProxy` (the proxy JobyardConsumer hands out): `__init__` copies
  the message's fields onto the proxy, which Dramatiq's `__getattr__` would otherwise read, each
  read after a failed lookup and its AttributeError (relies on `Message` being frozen).
- `RedisBroker` as `JobyardBroker`: `__init__` (a broker id that names its worker process, see
  `broker_id_of`), `add_middleware`, `emit_before`, `emit_after` (only the middleware hooks that
  do something are called: Dramatiq looks each one up by name for every signal of every
  message), `consume` (puts back messages a lost fetch reply left in this broker's ack set),
  `consumer_class`. Defines `do_fetch`, `do_requeue` and `do_enqueue`, which Dramatiq's
  `__getattr__` would make dispatch.lua calls of: on a queue (not a delay queue) they are
  jobyard.lua's band-aware `fetch`, `requeue` and `hand_back` (priorities, see
  docs/flow-control.md), on a delay queue Dramatiq's own (`_dispatch`). Calls `do_qsize`. Built
  with `maintenance_chance=0`: Dramatiq's chance maintenance would requeue a dead process's
  messages without jobyard's bookkeeping (jobyard.queue.reclaim does it).
- `ConsumerThread` as `KeepDelayedConsumerThread`: `delay_queue` (an attribute Dramatiq resets
  after a connection error, dropping the delayed messages it holds while their ids stay in a
  live worker's ack set, where nothing sweeps them), `handle_delayed_messages`, `close`.
- `WorkerThread` as `PullWorkerThread`: `__init__`, `run`. Its threads take messages from a
  `jobyard.queue.worker.PulledQueue` that stands in for Dramatiq's consumer thread: Dramatiq's
  `WorkerThread.process_message` calls `consumers[queue].post_process_message(message)` and
  `work_queue.task_done()` (`_Untracked`).
- `Worker` as `JobyardWorkerBase` (jobyard.queue.worker.JobyardWorker says how to make its
  PulledQueue and run a message): `_add_consumer` (underscore-private; called by Dramatiq's
  `_WorkerMiddleware` for each declared queue), `_add_worker` (called by `Worker.start`), and
  `stop` (Dramatiq's `join_all` takes the elapsed time off each thread's timeout, so a stop could
  give up long before the grace ends). Reads `consumers`, `consumer_whitelist`, `work_queue`,
  `workers`, `worker_timeout`, `delay_prefetch`, `queue_prefetch`.

Private uses outside classes:

- `dramatiq_maintenance`: Dramatiq's `dispatch.lua` called directly, its ARGV rebuilt by hand
  (`DISPATCH_LUA`), with `RedisBroker._max_unpack_size()`, to requeue messages of dead workers
  now rather than by chance (Dramatiq runs that maintenance on a random 0.1% of its calls).
- Dramatiq's Redis key layout (`dispatch.lua`'s `namespace:__acks__.<broker>.<queue>`,
  `<queue>.msgs`, `__heartbeats__`) restated in jobyard.queue.keys and used by jobyard.lua
  (its `ack` is Dramatiq's ack folded into jobyard's calls; `reclaim` is its dead-worker
  requeue, with jobyard's bookkeeping); `dramatiq.Message`'s field order restated by
  jobyard.queue.messages, which encodes messages without building a Message.

Public extension points used elsewhere (Middleware subclasses in jobyard.queue.tracing and
jobyard.worker.process, `CurrentMessage`, `TimeLimit`, `TimeLimitExceeded`, `Message`) are
Dramatiq's documented API; the hook names they implement are checked too (`MIDDLEWARE_HOOKS`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import threading
import time
from collections.abc import Callable
from importlib import resources
from queue import PriorityQueue
from typing import TYPE_CHECKING, Any, cast

import dramatiq
import redis
from dramatiq import Message
from dramatiq.broker import Broker, MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, current_millis, iter_queue, q_name
from dramatiq.errors import BrokerConnectionError, ConnectionClosed
from dramatiq.middleware import Middleware, MiddlewareError
from dramatiq.worker import CONSUMER_RESTART_DELAY_SECS, ConsumerThread, WorkerThread

from jobyard.queue import keys
from jobyard.queue.rotation import on_primary_key
from jobyard.queue.store.bands import BandCommands
from jobyard.queue.store.script import _text

if TYPE_CHECKING:
    from jobyard.queue.worker import PulledQueue

__all__ = [
    "ACKED",
    "CONSUMER_RESTART_DELAY_SECS",
    "BrokerConnectionError",
    "JobyardBroker",
    "JobyardConsumer",
    "JobyardWorkerBase",
    "PullWorkerThread",
    "broker_id_of",
    "check_installed_dramatiq",
    "dramatiq_maintenance",
]

#: Set on a MessageProxy once a jobyard Lua call has acked it: JobyardConsumer skips its ack.
ACKED = "jobyard_acked"

#: A broker id names its worker process: `<worker id>/<queue>`, so that whoever sees the process
#: die (its supervisor) can reclaim the messages it held at once (see jobyard.lua `reclaim`).
BROKER_ID_SEPARATOR = "/"


def broker_id_of(worker_id: str, queue: str) -> str:
    return f"{worker_id}{BROKER_ID_SEPARATOR}{queue}"


class FieldsProxy(MessageProxy):
    """Dramatiq's MessageProxy with its message's fields (the dataclass fields `RELIED_ON`
    lists for `Message`) copied onto it. Dramatiq's proxy reads them through `__getattr__`,
    which Python calls only once a failed lookup has raised an AttributeError, its text
    formatted: a run reads them about 20 times (Dramatiq's worker and middleware, the runner),
    7% of a worker process's instructions per no-op job (callgrind). The message is frozen, so
    the copies cannot go stale; anything else (`encode`, `copy`) is still the message's,
    through `__getattr__`."""

    def __init__(self, message: Message[Any]) -> None:
        super().__init__(message)
        self.queue_name = message.queue_name
        self.actor_name = message.actor_name
        self.args = message.args
        self.kwargs = message.kwargs
        self.options = message.options
        self.message_id = message.message_id
        self.message_timestamp = message.message_timestamp


class JobyardConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, with two changes:

    - it skips the ack round trip for messages a jobyard Lua call has already acked (`ACKED`);
    - it refills its prefetch window in batches, once half of it is free, and waits for that
      on the acks. Dramatiq's consumer fetches whatever is free, often one message per round
      trip, and when the window is full sleeps with a growing backoff (5, 10, 20 ms...) in
      which a busy worker's threads run dry.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.slot_freed = threading.Event()
        self.nudged = threading.Event()  # see `nudge`
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
        message = self._cached_or_fetched()
        if message is not None:
            self.delivered.add(message.options["redis_message_id"])
        return message

    def nudge(self) -> None:
        """A message entered the queue that an idle consumer should fetch now: its backoff
        wait ends (a parked job woken by flow control, a priority)."""
        self.misses = 0
        self.nudged.set()

    def _cached_or_fetched(self) -> MessageProxy | None:
        """Dramatiq's `__next__`, with its idle sleep replaced by a wait `nudge` ends."""
        try:
            while True:
                try:
                    data = self.message_cache.pop(0)
                except IndexError:
                    self.nudged.clear()  # before the fetch: a nudge during it is not missed
                    messages: list[bytes] = []
                    if self.outstanding_message_count < self.prefetch:
                        wanted = self.prefetch - self.outstanding_message_count
                        messages = self.broker.do_fetch(self.queue_name, wanted)
                        self.message_cache = messages
                    if not messages:
                        self.misses, backoff_ms = compute_backoff(
                            self.misses, max_backoff=self.timeout
                        )
                        self.nudged.wait(backoff_ms / 1000)
                        return None
                    continue
                if data is None:  # see Dramatiq's __next__ (its issue 266)
                    continue
                self.misses = 0
                message = Message.decode(data)
                self.queued_message_ids.add(message.message_id)
                return FieldsProxy(message)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Dramatiq maps only ConnectionError; a read that timed out (a Redis paused or
            # overloaded) is the same trouble, logged in one line and met with a new consumer,
            # not a traceback of an "unexpected error" (issue 29, item 4).
            raise ConnectionClosed(exc) from None

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
        return FieldsProxy(message)

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
                taken.append(FieldsProxy(Message.decode(data)))

    def untake(self, message: MessageProxy) -> None:
        """Gives back a message `take_cached` returned and nobody ran: it waits in the cache
        again, first, as if never taken (the next taker, or `take_all_cached`, gets it)."""
        self.delivered.discard(message.options["redis_message_id"])
        self.queued_message_ids.discard(message.message_id)
        self.message_cache.insert(0, message.encode())

    def cached_ids(self) -> set[str]:
        """The Redis message ids of the fetched messages not handed on yet."""
        return {
            Message.decode(data).options["redis_message_id"]
            for data in list(self.message_cache)
            if data is not None
        }

    def put_back(self, messages: list[MessageProxy]) -> None:
        """Returns fetched messages to the queue (Dramatiq's requeue)."""
        self.requeue(messages)  # type: ignore[no-untyped-call]

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
    returned. Dramatiq leaves those in a live worker's ack set, where nothing sweeps them.

    `broker_id`: see `broker_id_of` (Dramatiq's default is a random uuid)."""

    def __init__(self, *args: Any, broker_id: str | None = None, **kwargs: Any) -> None:
        self._hooks: dict[str, list[Any]] = {}
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        if broker_id is not None:
            self.broker_id = broker_id
        self.bands = BandCommands(self.client)
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

    def do_fetch(self, queue_name: str, count: int) -> list[bytes]:
        """Up to `count` messages of `queue_name`, a queue's bands before and after its list."""
        if queue_name.endswith(keys.DELAY_SUFFIX):
            fetch = self._dispatch("fetch")  # type: ignore[no-untyped-call]
            return cast(list[bytes], fetch(queue_name, count))
        return self.bands.fetch(self.broker_id, queue_name, current_millis(), count)

    def requeue_in_order(self, queue_name: str, message_ids: list[str]) -> None:
        """Puts fetched messages back where they were, in the order they were fetched: a
        fetch after it takes them again, after any message of higher priority that came."""
        self.bands.requeue(self.broker_id, queue_name, message_ids, in_order=True)

    def do_requeue(self, queue_name: str, *message_ids: str) -> None:
        """Puts fetched messages back, each to where it waited (its band, or the list)."""
        if queue_name.endswith(keys.DELAY_SUFFIX):
            self._dispatch("requeue")(queue_name, *message_ids)  # type: ignore[no-untyped-call]
            return
        self.bands.requeue(self.broker_id, queue_name, message_ids)

    def do_enqueue(self, queue_name: str, message_id: str, data: bytes) -> None:
        """Dramatiq's enqueue; a message entering a queue (a delayed one come due: jobyard
        dispatches through JobStore) goes to its job's band."""
        if queue_name.endswith(keys.DELAY_SUFFIX):
            self._dispatch("enqueue")(queue_name, message_id, data)  # type: ignore[no-untyped-call]
            return
        # Fetched from the delay queue maybe before a key rotation: on the current key.
        self.bands.hand_back(queue_name, message_id, on_primary_key(data))

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

    def unheld(self, queue_name: str, cached: Callable[[], set[str]]) -> set[str]:
        """The ids in this broker's ack set of `queue_name` that its process does not hold: not
        handed on to a thread or the delay queue (`delivered`), not fetched and waiting
        (`cached()`), both read after the ack set. The write that acked one may have been lost
        in a failover (see jobyard.queue.worker.StrandedSweep). One settled meanwhile may be
        among them (a requeue moves only ids still in the ack set: it stays acked), and so may
        one passing from a fetch reply or the cache to a thread at that moment: the caller
        requeues only ids it finds here twice, a heartbeat apart."""
        try:
            held = self.client.smembers(keys.dramatiq_acks(self.broker_id, queue_name))
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from exc
        acked = {_text(m) for m in held}
        if not acked:
            return set()
        return acked - cached() - set(self.delivered(queue_name))

    @property
    def consumer_class(self) -> type[JobyardConsumer]:
        return JobyardConsumer


def dramatiq_maintenance(broker: RedisBroker, queue: str, timestamp_ms: int) -> None:
    """Dramatiq's own maintenance of `queue`, now: requeues the messages held by brokers whose
    heartbeat is older than the broker's timeout at `timestamp_ms`, forgets those brokers, and
    drops expired dead letters. Through `dispatch.lua`'s "qsize" command (which does nothing
    else), its ARGV as `DISPATCH_LUA` records it."""
    broker.scripts["dispatch"](
        keys=[broker.namespace],
        args=[
            "qsize",
            timestamp_ms,
            queue,
            broker.broker_id,
            broker.heartbeat_timeout,
            broker.dead_message_ttl,
            1,  # do_maintenance
            broker._max_unpack_size(),
        ],
    )


class KeepDelayedConsumerThread(ConsumerThread):
    """Keeps its delayed messages across a connection error: ignores the reset of
    `delay_queue` that follows one, and does not hand them back on the close after it."""

    _kept: PriorityQueue[Any] | None = None

    @property
    def delay_queue(self) -> PriorityQueue[Any]:
        assert self._kept is not None
        return self._kept

    @delay_queue.setter
    def delay_queue(self, queue: PriorityQueue[Any]) -> None:
        if self._kept is None:
            self._kept = queue

    def handle_delayed_messages(self) -> None:
        """Dramatiq's, except that a message whose enqueue fails goes back on the delay queue
        (to be enqueued again once Redis answers; a second copy from an enqueue that reached
        Redis runs once, see the job's seq) and the error is the connection error it is.

        Called after every message: an empty delay queue is seen without a get (which takes its
        lock and raises Empty). Only this thread adds to it, so the look cannot miss one."""
        if not self.delay_queue.queue:
            return
        for item in iter_queue(self.delay_queue):
            message = item.message
            if item.priority > current_millis():
                self.delay_queue.put(item)
                self.delay_queue.task_done()
                break
            ready = message.copy(queue_name=q_name(message.queue_name))
            del ready.options["eta"]
            try:
                self.broker.enqueue(ready)
            except redis.RedisError as exc:
                self.delay_queue.put(item)
                self.delay_queue.task_done()
                raise ConnectionClosed(exc) from exc
            self.post_process_message(message)
            self.delay_queue.task_done()

    def close(self) -> None:
        if self.running:  # a reconnect, not a stop: the delayed messages stay ours
            with contextlib.suppress(BrokerConnectionError):
                if self.consumer:
                    self.consumer.close()
            return
        super().close()


class _Untracked(PriorityQueue[Any]):
    """A PullWorkerThread's stand-in for the work queue: its messages never pass through one."""

    def task_done(self) -> None:
        pass


class PullWorkerThread(WorkerThread):
    """A Dramatiq worker thread that takes its messages from a PulledQueue, which stands in for
    Dramatiq's consumer thread (`process_message` calls its `post_process_message`).
    `run_message(thread, message)` runs each one (see jobyard.queue.worker)."""

    def __init__(
        self,
        *,
        broker: Broker,
        queue: PulledQueue,
        worker_timeout: int,
        run_message: Callable[[PullWorkerThread, MessageProxy], None],
    ) -> None:
        super().__init__(
            broker=broker,
            consumers={queue.queue_name: queue},  # type: ignore[dict-item]  # its post_process_message
            work_queue=_Untracked(),
            worker_timeout=worker_timeout,
        )
        self.queue = queue
        self.run_message = run_message

    def stopping(self) -> bool:
        return not self.running

    def run(self) -> None:
        self.running = True
        self.broker.emit_after("worker_thread_boot", self)
        while self.running:
            message = self.queue.next_message()
            if message is not None:
                self.run_message(self, message)
        self.broker.emit_before("worker_thread_shutdown", self)


class JobyardWorkerBase(dramatiq.Worker):
    """Runs one queue: its worker threads pull from a PulledQueue; its delay queue keeps a
    consumer thread (it only moves messages that come due to the queue). The subclass
    (jobyard.queue.worker.JobyardWorker) says how to make the PulledQueue and run a message."""

    pulled: PulledQueue | None = None

    def pulled_queue(self, queue_name: str) -> PulledQueue:
        raise NotImplementedError

    def run_message(self, thread: PullWorkerThread, message: MessageProxy) -> None:
        raise NotImplementedError

    def _add_consumer(self, queue_name: str, *, delay: bool = False) -> None:
        # dramatiq 2.x's Worker._add_consumer, with the consumer classes above.
        if queue_name in self.consumers:
            return
        if self.consumer_whitelist and q_name(queue_name) not in self.consumer_whitelist:
            return
        if not delay:
            if self.pulled is not None and self.pulled.queue_name != queue_name:
                raise ValueError("a JobyardWorker runs one queue")
            self.pulled = self.pulled_queue(queue_name)
            return
        consumer = self.consumers[queue_name] = KeepDelayedConsumerThread(
            broker=self.broker,
            queue_name=queue_name,
            prefetch=self.delay_prefetch,
            work_queue=self.work_queue,
            worker_timeout=self.worker_timeout,
        )
        consumer.start()

    def _add_worker(self) -> None:
        if self.pulled is None:
            raise ValueError("the worker's queue is not declared on its broker")
        thread = PullWorkerThread(
            broker=self.broker,
            queue=self.pulled,
            worker_timeout=self.worker_timeout,
            run_message=self.run_message,
        )
        thread.start()
        self.workers.append(thread)

    def stop(self, timeout: int = 600000) -> None:
        """Lets the worker threads finish their messages until `timeout` ms from now, then
        stops the consumers as Dramatiq does (requeueing what is left in memory)."""
        deadline = time.monotonic() + timeout / 1000
        if self.pulled is not None:
            self.pulled.stop_taking()
        for thread in self.workers:
            thread.stop()
        for thread in self.workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.pulled is not None:
            self.pulled.close()
        super().stop(timeout=max(1, int((deadline - time.monotonic()) * 1000)))


# --- What the fence was written for (checked by tests/test_dramatiq_fence.py) ---------------

#: Members the classes above override: Dramatiq class, member, and its signature in Dramatiq
#: 2.2 (`str(inspect.signature(...))`; a property's getter).
OVERRIDDEN: dict[str, dict[str, str]] = {
    "dramatiq.brokers.redis._RedisConsumer": {
        "__init__": "(self, broker, queue_name, prefetch, timeout)",
        "__next__": "(self)",
        "ack": "(self, message)",
        "nack": "(self, message)",
    },
    "dramatiq.broker.MessageProxy": {
        "__init__": "(self, message: 'Message') -> 'None'",
    },
    "dramatiq.brokers.redis.RedisBroker": {
        "__init__": "(self, *, url=None, middleware=None, namespace='dramatiq', "
        "maintenance_chance=1000, heartbeat_timeout=60000, dead_message_ttl=604800000, "
        "client=None, **parameters)",
        "add_middleware": "(self, middleware: 'Middleware', *, before: "
        "'Optional[type[Middleware]]' = None, after: 'Optional[type[Middleware]]' = None) "
        "-> 'None'",
        "emit_before": "(self, signal: 'str', *args: 'Any', **kwargs: 'Any') -> 'None'",
        "emit_after": "(self, signal: 'str', *args: 'Any', **kwargs: 'Any') -> 'None'",
        "consume": "(self, queue_name: 'str', prefetch: 'int' = 1, timeout: 'int' = 5000) "
        "-> 'Consumer'",
        "consumer_class": "(self)",
    },
    "dramatiq.worker.ConsumerThread": {
        "handle_delayed_messages": "(self) -> 'None'",
        "close": "(self) -> 'None'",
    },
    "dramatiq.worker.WorkerThread": {
        "__init__": "(self, *, broker: 'Broker', consumers: 'dict[str, ConsumerThread]', "
        "work_queue: 'PriorityQueue[_WorkQueueItem]', worker_timeout: 'int') -> 'None'",
        "run": "(self) -> 'None'",
    },
    "dramatiq.worker.Worker": {
        "_add_consumer": "(self, queue_name: 'str', *, delay: 'bool' = False) -> 'None'",
        "_add_worker": "(self) -> 'None'",
        "stop": "(self, timeout: 'int' = 600000) -> 'None'",
    },
}

#: Members used without overriding them, with their 2.2 signature; "" for an attribute set on
#: instances (checked on an instance, see `_instances`).
RELIED_ON: dict[str, dict[str, str]] = {
    "dramatiq.brokers.redis._RedisConsumer": {
        "requeue": "(self, messages)",
        "outstanding_message_count": "(self)",
        "message_cache": "",
        "queued_message_ids": "",
        "prefetch": "",
        "timeout": "",
        "misses": "",
    },
    "dramatiq.brokers.redis.RedisBroker": {
        "_max_unpack_size": "(self)",
        "_dispatch": "(self, command)",
        "enqueue": "(self, message: 'Message', *, delay: 'Optional[int]' = None) -> 'Message'",
        "scripts": "",
        "broker_id": "",
        "namespace": "",
        "heartbeat_timeout": "",
        "dead_message_ttl": "",
        "maintenance_chance": "",
        "middleware": "",
    },
    "dramatiq.worker.ConsumerThread": {
        "__init__": "(self, *, broker: 'Broker', queue_name: 'str', prefetch: 'int', "
        "work_queue: 'PriorityQueue[_WorkQueueItem]', worker_timeout: 'int') -> 'None'",
        "post_process_message": "(self, message: 'MessageProxy') -> 'None'",
        "delay_queue": "",
        "consumer": "",
        "running": "",
    },
    "dramatiq.worker.WorkerThread": {
        "process_message": "(self, message: 'MessageProxy') -> 'None'",
        "stop": "(self) -> 'None'",
        "running": "",
    },
    "dramatiq.worker.Worker": {
        "__init__": "(self, broker: 'Broker', *, queues: 'Optional[set[str]]' = None, "
        "worker_timeout: 'int' = 1000, worker_threads: 'int' = 8) -> 'None'",
        "consumers": "",
        "consumer_whitelist": "",
        "work_queue": "",
        "workers": "",
        "worker_timeout": "",
        "delay_prefetch": "",
        "queue_prefetch": "",
    },
    "dramatiq.broker.MessageProxy": {
        "__getattr__": "(self, name: 'str') -> 'Any'",
    },
    "dramatiq.message.Message": {
        # jobyard.queue.messages encodes these fields, in this order, without a Message.
        "__dataclass_fields__": "queue_name actor_name args kwargs options message_id "
        "message_timestamp",
    },
}

#: How Dramatiq calls the overrides: (function, a line of its source). An override whose caller
#: stopped calling it would be as dead as a renamed one.
CALLERS: list[tuple[str, str]] = [
    (
        "dramatiq.worker._WorkerMiddleware.after_declare_queue",
        "self.worker._add_consumer(queue_name)",
    ),
    (
        "dramatiq.worker._WorkerMiddleware.after_declare_delay_queue",
        "self.worker._add_consumer(queue_name, delay=True)",
    ),
    ("dramatiq.worker.Worker.start", "self._add_worker()"),
    ("dramatiq.worker.ConsumerThread.run", "self.delay_queue = PriorityQueue()"),
    (
        "dramatiq.worker.WorkerThread.process_message",
        "self.consumers[message.queue_name].post_process_message(message)",
    ),
    ("dramatiq.worker.WorkerThread.process_message", "self.work_queue.task_done()"),
    (
        "dramatiq.brokers.redis._RedisConsumer.__next__",
        "self.message_cache = messages = self.broker.do_fetch(",
    ),
    (
        "dramatiq.brokers.redis._RedisConsumer.requeue",
        "self.broker.do_requeue(self.queue_name, *message_ids)",
    ),
    (
        "dramatiq.brokers.redis.RedisBroker.enqueue",
        'self.do_enqueue(queue_name, message.options["redis_message_id"], message.encode())',
    ),
    ("dramatiq.brokers.redis.RedisBroker.__getattr__", "return self._dispatch(command)"),
]

#: Dramatiq's dispatch.lua as `dramatiq_maintenance`, jobyard.queue.keys and jobyard.lua rely on
#: it: its ARGV by position, the lines that build the keys jobyard names by hand, and the
#: commands called.
DISPATCH_LUA: dict[str, Any] = {
    "argv": [
        "command",
        "timestamp",
        "queue_name",
        "worker_id",
        "heartbeat_timeout",
        "dead_message_ttl",
        "do_maintenance",
        "max_unpack_size",
    ],
    "first_command_arg": 9,  # `for i=9,#ARGV do ARGS[i - 8] = ARGV[i]`
    "lines": [
        'local acks = namespace .. ":__acks__." .. worker_id',
        'local heartbeats = namespace .. ":__heartbeats__"',
        'local queue_acks = acks .. "." .. queue_name',
        'local queue_full_name = namespace .. ":" .. queue_name',
        'local queue_messages = queue_full_name .. ".msgs"',
        'local dead_worker_acks = namespace .. ":__acks__." .. dead_worker',
        'local dead_worker_queue_acks = dead_worker_acks .. "." .. queue_name',
        "for i=9,#ARGV do",
        'if do_maintenance == "1" then',
    ],
    "commands": ["enqueue", "fetch", "requeue", "ack", "qsize"],
}

#: Middleware hooks jobyard's middleware implement (Dramatiq calls them by name).
MIDDLEWARE_HOOKS = [
    "before_process_message",
    "after_process_message",
    "after_skip_message",
    "after_worker_thread_boot",
    "before_worker_thread_shutdown",
    "after_process_boot",
]

_ARGV_LINE = re.compile(r"^local (\w+) = ARGV\[(\d+)\]\s*$", re.MULTILINE)


def _resolve(dotted: str) -> Any:
    """The object `dotted` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ImportError(dotted)


def _signature(member: Any) -> str:
    if isinstance(member, property):
        member = member.fget
    return str(inspect.signature(member))


def _instances() -> dict[str, Any]:
    """One instance of each class, made without touching Redis, to see its attributes."""
    from dramatiq.brokers.redis import RedisBroker as Broker_
    from dramatiq.worker import Worker

    broker = Broker_(client=redis.Redis(port=1))
    consumer = _RedisConsumer(broker, "fence", 1, 1000)
    return {
        "dramatiq.brokers.redis._RedisConsumer": consumer,
        "dramatiq.brokers.redis.RedisBroker": broker,
        "dramatiq.worker.ConsumerThread": ConsumerThread(
            broker=broker,
            queue_name="fence",
            prefetch=1,
            work_queue=PriorityQueue(),
            worker_timeout=1000,
        ),
        "dramatiq.worker.WorkerThread": WorkerThread(
            broker=broker, consumers={}, work_queue=PriorityQueue(), worker_timeout=1000
        ),
        "dramatiq.worker.Worker": Worker(broker),
    }


def _check_members(table: dict[str, dict[str, str]], problems: list[str]) -> None:
    instances = _instances()
    for dotted, members in table.items():
        try:
            cls = _resolve(dotted)
        except (ImportError, AttributeError):
            problems.append(f"{dotted}: missing")
            continue
        for name, expected in members.items():
            where = f"{dotted}.{name}"
            if name == "__dataclass_fields__":
                found = " ".join(getattr(cls, name, {}))
                if found != expected:
                    problems.append(f"{where}: {found!r}, written for {expected!r}")
                continue
            if not expected:
                instance = instances.get(dotted)
                if instance is None or not hasattr(instance, name):
                    problems.append(f"{where}: no such attribute on an instance")
                continue
            try:
                member = inspect.getattr_static(cls, name)
            except AttributeError:
                problems.append(f"{where}: missing")
                continue
            found = _signature(member)
            if found != expected:
                problems.append(f"{where}{found}: written for {name}{expected}")


def _check_callers(problems: list[str]) -> None:
    for dotted, line in CALLERS:
        try:
            source = inspect.getsource(_resolve(dotted))
        except (ImportError, AttributeError, OSError, TypeError):
            problems.append(f"{dotted}: missing")
            continue
        if line not in source:
            problems.append(f"{dotted}: no longer has `{line}`")


def dispatch_lua_source() -> str:
    """The installed Dramatiq's dispatch.lua (beside dramatiq/brokers/redis.py)."""
    return resources.files("dramatiq.brokers").joinpath("redis", "dispatch.lua").read_text()


def _check_dispatch_lua(problems: list[str]) -> None:
    try:
        source = dispatch_lua_source()
    except (FileNotFoundError, ModuleNotFoundError):
        problems.append("dramatiq/brokers/redis/dispatch.lua: missing")
        return
    argv = [name for name, _ in sorted(_ARGV_LINE.findall(source), key=lambda m: int(m[1]))]
    positions = [int(at) for _, at in _ARGV_LINE.findall(source)]
    if argv != DISPATCH_LUA["argv"] or sorted(positions) != list(range(1, len(argv) + 1)):
        problems.append(f"dispatch.lua ARGV: {argv}, written for {DISPATCH_LUA['argv']}")
    lines = {line.strip() for line in source.splitlines()}
    for line in DISPATCH_LUA["lines"]:
        if line not in lines:
            problems.append(f"dispatch.lua: no longer has `{line}`")
    for command in DISPATCH_LUA["commands"]:
        if f'command == "{command}"' not in source:
            problems.append(f"dispatch.lua: no command {command!r}")


def check_installed_dramatiq() -> list[str]:
    """What differs between the installed Dramatiq and the one this fence was written for:
    [] when nothing does."""
    problems: list[str] = []
    _check_members(OVERRIDDEN, problems)
    _check_members(RELIED_ON, problems)
    _check_callers(problems)
    _check_dispatch_lua(problems)
    for hook in MIDDLEWARE_HOOKS:
        if not callable(getattr(Middleware, hook, None)):
            problems.append(f"dramatiq.middleware.Middleware.{hook}: missing")
    params = getattr(Message, "__dataclass_params__", None)
    if not getattr(params, "frozen", False):  # FieldsProxy's copies would go stale
        problems.append("dramatiq.message.Message: no longer a frozen dataclass")
    return problems


def main() -> int:
    """`python -m jobyard.queue.dramatiq_compat`: exits 1, listing them, if the installed
    Dramatiq differs from the one the fence was written for."""
    problems = check_installed_dramatiq()
    for problem in problems:
        print(problem)
    print(
        f"dramatiq {dramatiq.__version__} at {dramatiq.__file__}: "
        + (f"{len(problems)} difference(s) from the fence" if problems else "as the fence expects")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

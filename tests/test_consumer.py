"""JobyardConsumer refills its prefetch window in batches, woken by acks; JobyardWorker's
threads share it (real Redis)."""

from __future__ import annotations

import dataclasses
import threading
import time

import dramatiq
import pytest
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware, SkipMessage

from jobyard.queue.broker import JobyardBroker
from jobyard.queue.runner import ACKED
from jobyard.queue.worker import JobyardWorker
from tests.support import RedisServer, wait_for

QUEUE = "default"


def fill(redis_url: str, count: int) -> None:
    sender = RedisBroker(url=redis_url, namespace="dramatiq")
    sender.declare_queue(QUEUE)
    for i in range(count):
        sender.enqueue(Message(QUEUE, "noop", (i,), {}, {}))
    sender.close()


def take(consumer, count: int) -> list:
    taken = []
    deadline = time.monotonic() + 5
    while len(taken) < count and time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            taken.append(message)
    assert len(taken) == count
    return taken


def settle(consumer, messages) -> None:
    for message in messages:
        setattr(message, ACKED, True)  # as the runner's Lua call does
        consumer.ack(message)


def test_a_full_window_waits_until_half_is_free_then_fetches_a_batch(redis_server) -> None:
    fill(redis_server.url, 20)
    broker = JobyardBroker(url=redis_server.url, namespace="dramatiq")
    consumer = broker.consume(QUEUE, prefetch=8, timeout=100)
    running = take(consumer, 8)
    assert next(consumer) is None  # all eight held: no fetch
    settle(consumer, running[:3])
    assert next(consumer) is None  # five still held: more than half the window
    settle(consumer, running[3:4])
    # Four held: a batch of four comes in one fetch.
    assert take(consumer, 4) and not consumer.message_cache
    assert broker.client.llen(f"dramatiq:{QUEUE}") == 20 - 12
    broker.close()


def test_an_ack_wakes_a_waiting_consumer_at_once(redis_server) -> None:
    fill(redis_server.url, 10)
    broker = JobyardBroker(url=redis_server.url, namespace="dramatiq")
    consumer = broker.consume(QUEUE, prefetch=2, timeout=5000)
    running = take(consumer, 2)
    threading.Timer(0.1, settle, (consumer, running)).start()
    started = time.monotonic()
    assert next(consumer) is not None  # woken by the acks, not by the 5 s timeout
    assert time.monotonic() - started < 2
    broker.close()


def pulled_worker(redis_url: str, run, *, threads: int, prefetch: int):
    """A JobyardWorker on QUEUE whose actor calls `run(n)` for message n."""
    broker = JobyardBroker(url=redis_url, namespace="dramatiq", middleware=[])
    dramatiq.Actor(run, broker=broker, actor_name="noop", queue_name=QUEUE, priority=0, options={})
    broker.declare_queue(QUEUE)
    worker = JobyardWorker(broker, queues={QUEUE}, worker_threads=threads, worker_timeout=100)
    worker.queue_prefetch = prefetch
    return broker, worker


def test_worker_threads_share_the_fetched_messages_and_none_waits_behind_a_busy_one(
    redis_server,
) -> None:
    fill(redis_server.url, 30)
    runs: list[int] = []
    release = threading.Event()

    def run(n: int) -> None:
        runs.append(n)
        if n == 0:  # the first message holds its thread until the others are done
            release.wait(10)

    broker, worker = pulled_worker(redis_server.url, run, threads=2, prefetch=8)
    worker.start()
    deadline = time.monotonic() + 10
    while len(runs) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    done_while_held = len(runs)
    release.set()
    worker.stop(timeout=5000)
    assert done_while_held == 30  # none waited for message 0's thread
    assert sorted(runs) == list(range(30))  # each once
    assert broker.client.llen(f"dramatiq:{QUEUE}") == 0
    assert broker.client.hlen(f"dramatiq:{QUEUE}.msgs") == 0  # every one acked
    broker.close()


def test_a_stop_puts_back_the_messages_fetched_and_not_taken(redis_server) -> None:
    fill(redis_server.url, 10)
    runs: list[int] = []
    started, release = threading.Event(), threading.Event()

    def run(n: int) -> None:
        runs.append(n)
        started.set()
        release.wait(10)

    broker, worker = pulled_worker(redis_server.url, run, threads=1, prefetch=8)
    worker.start()
    assert started.wait(5)
    stopping = threading.Thread(target=worker.stop, kwargs={"timeout": 5000})
    stopping.start()
    time.sleep(0.3)  # the stop is under way: no thread may take another message
    release.set()
    stopping.join(10)
    assert runs == [0]
    # The running one was acked; the seven fetched with it are back with the two never fetched.
    assert broker.client.llen(f"dramatiq:{QUEUE}") == 9
    assert broker.client.hlen(f"dramatiq:{QUEUE}.msgs") == 9
    assert not broker.client.keys("dramatiq:__acks__.*")
    broker.close()


class Recording(Middleware):
    def __init__(self, name: str, calls: list[str], *, fail: bool = False) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    def before_process_message(self, broker, message) -> None:
        self.calls.append(f"before {self.name}")
        if self.fail:
            raise RuntimeError("broken middleware")

    def after_process_message(self, broker, message, *, result=None, exception=None) -> None:
        self.calls.append(f"after {self.name}")


class Skipping(Middleware):
    def before_process_message(self, broker, message) -> None:
        raise SkipMessage()


def test_signals_reach_the_middleware_that_handle_them_in_dramatiqs_order(redis_server) -> None:
    calls: list[str] = []
    broker = JobyardBroker(url=redis_server.url, namespace="dramatiq", middleware=[])
    broker.add_middleware(Recording("a", calls))
    broker.add_middleware(Middleware())  # handles nothing: not called
    assert broker.hooks("before_process_message") == [broker.middleware[0].before_process_message]
    broker.add_middleware(Recording("b", calls, fail=True))  # a new one is seen at once
    broker.emit_before("process_message", None)  # b's failure is logged, not raised
    broker.emit_after("process_message", None, result=None)
    assert calls == ["before a", "before b", "after b", "after a"]
    broker.add_middleware(Skipping())
    with pytest.raises(SkipMessage):  # Dramatiq's worker acts on it
        broker.emit_before("process_message", None)
    broker.close()


def test_a_handed_message_reads_its_fields_without_dramatiqs_getattr(
    redis_server, monkeypatch
) -> None:
    """Dramatiq's MessageProxy reads every field of its message through `__getattr__`, which
    Python calls only after building an AttributeError: about 20 a run, 7% of a no-op job's
    worker instructions. The consumer's messages (fetched, cached, taken back) carry them."""
    fill(redis_server.url, 3)
    broker = JobyardBroker(url=redis_server.url, namespace="dramatiq")
    consumer = broker.consume(QUEUE, prefetch=4, timeout=100)
    fetched = take(consumer, 1)[0]
    cached = consumer.take_cached()
    [taken_back] = consumer.take_all_cached()

    def through_getattr(proxy, name: str):
        raise AssertionError(f"{name} read through MessageProxy.__getattr__")

    monkeypatch.setattr(MessageProxy, "__getattr__", through_getattr)
    for message in (fetched, cached, taken_back):
        for field in dataclasses.fields(Message):
            assert getattr(message, field.name) == getattr(message._message, field.name)
    monkeypatch.undo()
    assert taken_back.encode() == taken_back._message.encode()  # the rest: the message's
    broker.close()


def test_a_new_consumer_puts_back_what_a_fetch_took_and_nobody_was_handed(redis_server) -> None:
    """A fetch whose reply was lost moved its ids into this broker's ack set, where no sweep of a
    live worker finds them: the consumer made next (PulledQueue makes one after an error) puts
    them back; the messages threads were handed stay with them."""
    fill(redis_server.url, 6)
    broker = JobyardBroker(url=redis_server.url, namespace="dramatiq")
    consumer = broker.consume(QUEUE, prefetch=2, timeout=100)
    handed = take(consumer, 2)  # fetched and handed to threads
    broker.do_fetch(QUEUE, 3)  # as if its reply were lost
    assert broker.client.llen(f"dramatiq:{QUEUE}") == 1
    broker.consume(QUEUE, prefetch=2, timeout=100)
    assert broker.client.llen(f"dramatiq:{QUEUE}") == 4  # the lost reply's three are back
    acks = broker.client.smembers(f"dramatiq:__acks__.{broker.broker_id}.{QUEUE}")
    assert {a.decode() for a in acks} == {m.options["redis_message_id"] for m in handed}
    broker.close()


def test_the_worker_keeps_running_its_queue_after_redis_comes_back() -> None:
    """Liveness only: no worker thread dies or hangs on the failed fetches. (What a lost fetch
    reply held is put back by the next consumer: see the test above.)"""
    server = RedisServer(aof=True).start()
    try:
        fill(server.url, 20)
        runs: list[int] = []

        def run(n: int) -> None:
            runs.append(n)
            time.sleep(0.05)

        broker, worker = pulled_worker(server.url, run, threads=2, prefetch=2)
        broker.client.connection_pool.connection_kwargs["socket_timeout"] = 1
        worker.start()
        wait_for(lambda: len(runs) >= 4, timeout=5)
        server.kill()
        time.sleep(1.5)  # the threads' fetches fail meanwhile
        server.start()
        wait_for(lambda: set(runs) == set(range(20)), timeout=30)
        worker.stop(timeout=5000)
        broker.close()
    finally:
        server.stop()


def test_a_read_that_times_out_is_a_closed_connection_not_an_unexpected_error() -> None:
    """A paused Redis (a read past the socket timeout) is met as a lost connection: Dramatiq's
    consumer threads and jobyard's log it in one line and build a new consumer, where an
    "unexpected error" would log a traceback per consumer (issue 29, item 4)."""
    import redis
    from dramatiq.errors import ConnectionClosed

    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=0.5)
        broker = JobyardBroker(client=client, namespace="dramatiq")
        consumer = broker.consume(QUEUE, prefetch=8, timeout=100)
        assert next(consumer) is None  # an empty queue, Redis answering
        server.pause()
        try:
            with pytest.raises(ConnectionClosed) as raised:
                next(consumer)
            assert isinstance(raised.value.__cause__ or raised.value.args[0], redis.TimeoutError)
        finally:
            server.resume()
        broker.close()
    finally:
        server.stop()

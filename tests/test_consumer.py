"""JobyardConsumer refills its prefetch window in batches, woken by acks (real Redis)."""

from __future__ import annotations

import threading
import time

from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from jobyard.queue.broker import JobyardBroker
from jobyard.queue.runner import ACKED

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

"""CallGroup: a worker process's concurrent script calls share round trips (real Redis)."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from jobyard.queue.client import ConnectFailed, make_client
from jobyard.queue.direct import CallGroup, DirectJobStore


def _group(url: str, timeout: float = 5.0) -> CallGroup:
    pool = make_client(url, timeout=timeout).connection_pool
    return CallGroup(lambda: pool.connection_class(**pool.connection_kwargs))


def _in_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Runs target(0..count-1) in as many threads; returns each one's result or error."""
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            results[index] = target(index)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def _queued(group: CallGroup, count: int) -> None:
    """Waits until `count` calls wait behind the round trip under way."""
    deadline = time.monotonic() + 10
    while len(group._waiting) < count:
        assert time.monotonic() < deadline, "the calls never queued"
        time.sleep(0.005)


def _reads(client: redis.Redis) -> int:
    return int(client.info("stats")["total_reads_processed"])


def test_every_thread_gets_its_own_reply(redis_server) -> None:
    group = _group(redis_server.url)
    results = _in_threads(16, lambda t: [group.call(("ECHO", f"{t}:{i}")) for i in range(300)])
    for thread, replies in enumerate(results):
        assert replies == [f"{thread}:{i}".encode() for i in range(300)]


def test_calls_made_during_a_round_trip_go_together_in_the_next(redis_server) -> None:
    """Redis paused: the first call's round trip stays open while seven more are made; once it
    answers, the seven go in one write, which Redis reads at once."""
    group = _group(redis_server.url)
    group.call(("PING",))  # connected
    client = redis_server.client()
    reads_before = _reads(client)
    redis_server.pause()
    first = _in_threads_later(1, lambda _: group.call(("INCR", "n")))
    _queued(group, 0)
    time.sleep(0.05)
    rest = _in_threads_later(7, lambda _: group.call(("INCR", "n")))
    _queued(group, 7)
    redis_server.resume()
    replies = first() + rest()
    assert sorted(replies) == list(range(1, 9))
    # Two reads for eight calls (this client's INFO is one more); alone, each call is a read.
    assert _reads(client) - reads_before <= 3


def _in_threads_later(count: int, target: Callable[[int], Any]) -> Callable[[], list[Any]]:
    """Starts `_in_threads` in the background; the returned function waits for its results."""
    box: list[list[Any]] = []
    runner = threading.Thread(target=lambda: box.append(_in_threads(count, target)))
    runner.start()

    def results() -> list[Any]:
        runner.join(30)
        return box[0]

    return results


def test_an_error_reply_is_its_own_calls_only(redis_server) -> None:
    group = _group(redis_server.url)
    fail = "return redis.error_reply('refused ' .. ARGV[1])"

    def calls(thread: int) -> list[Any]:
        out: list[Any] = []
        for i in range(100):
            if (thread + i) % 3 == 0:
                with pytest.raises(redis.ResponseError, match=f"refused {thread}:{i}$"):
                    group.call(("EVAL", fail, 0, f"{thread}:{i}"))
                out.append("refused")
            else:
                out.append(group.call(("ECHO", f"{thread}:{i}")))
        return out

    for thread, replies in enumerate(_in_threads(8, calls)):
        assert replies == [
            "refused" if (thread + i) % 3 == 0 else f"{thread}:{i}".encode() for i in range(100)
        ]


def test_a_lost_server_fails_the_call_in_flight_and_the_waiting_ones_are_not_sent(
    redis_server,
) -> None:
    group = _group(redis_server.url)
    group.call(("PING",))
    redis_server.pause()
    first = _in_threads_later(1, lambda _: group.call(("INCR", "n")))
    time.sleep(0.05)
    rest = _in_threads_later(4, lambda _: group.call(("INCR", "n")))
    _queued(group, 4)
    redis_server.kill_paused()
    (in_flight,) = first()
    assert isinstance(in_flight, redis.ConnectionError)
    # The next round trip's connect fails: nothing was sent, so the outcome is known.
    assert all(isinstance(error, ConnectFailed) for error in rest())


def test_an_interrupted_leader_raises_in_its_own_thread_only(redis_server) -> None:
    pool = make_client(redis_server.url, timeout=5.0).connection_pool
    connects: list[str] = []

    def connect() -> Any:
        connects.append("connect")
        if len(connects) == 1:  # the first round trip: interrupted once three calls wait
            _queued(group, 3)
            raise KeyboardInterrupt
        return pool.connection_class(**pool.connection_kwargs)

    group = CallGroup(connect)
    first = _in_threads_later(1, lambda _: group.call(("ECHO", "first")))
    _queued(group, 0)
    time.sleep(0.05)
    rest = _in_threads(3, lambda t: group.call(("ECHO", f"later {t}")))
    assert isinstance(first()[0], KeyboardInterrupt)
    assert rest == [b"later 0", b"later 1", b"later 2"]


def test_a_worker_store_groups_its_calls_and_keeps_its_replies(redis_server) -> None:
    store = DirectJobStore(make_client(redis_server.url, timeout=2.0), group_calls=True)
    store.heartbeat("w1", "b1", ["default"])
    redis_server.client().script_flush()  # NOSCRIPT goes to its call, which loads and retries
    leases = _in_threads(8, lambda t: store.take_lease("lease", f"holder {t}", 10_000))
    assert sorted(leases) == [False] * 7 + [True]
    assert store.live_workers("default", 60_000) == 1
    with pytest.raises(redis.DataError):  # a value hiredis cannot pack: redis-py says why
        store.take_lease("lease", True, 10_000)  # type: ignore[arg-type]
    assert store.live_workers("default", 60_000) == 1


class _TimeLimit(BaseException):
    """Stands for Dramatiq's TimeLimitExceeded, which its TimeLimit middleware raises in a job's
    thread from another thread (PyThreadState_SetAsyncExc), wherever that thread is."""


def _raise_in(thread: threading.Thread, exc: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))


def test_a_call_interrupted_once_handed_the_lead_still_sends_the_calls_behind_it(
    redis_server,
) -> None:
    """The next leader's thread is interrupted while it waits (the exception lands when it
    wakes): it raises, but first sends the round trip it was handed, so the calls queued
    behind it are answered and later calls do not wait forever."""
    group = _group(redis_server.url)
    group.call(("PING",))
    redis_server.pause()
    outcomes: dict[str, object] = {}

    def calling(name: str) -> threading.Thread:
        def run() -> None:
            try:
                outcomes[name] = group.call(("INCR", "n"))
            except BaseException as exc:
                outcomes[name] = exc

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    leader = calling("leader")
    _queued(group, 0)
    time.sleep(0.05)
    next_leader = calling("next leader")
    _queued(group, 1)
    behind = calling("behind")
    _queued(group, 2)
    _raise_in(next_leader, _TimeLimit)  # lands when it wakes, handed the lead
    redis_server.resume()
    for thread in (leader, next_leader, behind):
        thread.join(10)
    assert not any(t.is_alive() for t in (leader, next_leader, behind)), outcomes
    assert isinstance(outcomes["next leader"], _TimeLimit)
    assert outcomes["leader"] == 1 and outcomes["behind"] == 3  # the interrupted one ran too
    assert group.call(("INCR", "n")) == 4

"""DirectJobStore: the worker's jobyard.lua calls over a per-thread connection (real Redis)."""

from __future__ import annotations

import threading

import pytest
import redis

from jobyard.queue.client import ConnectFailed, make_client
from jobyard.queue.direct import DirectJobStore
from jobyard.queue.store import JobStore


def test_replies_are_the_ones_redis_py_gives(redis_server) -> None:
    client = make_client(redis_server.url, timeout=2.0)
    direct, plain = DirectJobStore(client), JobStore(client)
    direct.heartbeat("w1", "b1", ["default"])
    plain.heartbeat("w2", "b2", ["default"])
    assert direct.live_workers("default", 60_000) == plain.live_workers("default", 60_000) == 2
    assert direct.take_lease("lease", "me", 10_000) is True
    assert plain.take_lease("lease", "other", 10_000) is False


def test_a_flushed_script_is_loaded_again(redis_server) -> None:
    client = make_client(redis_server.url, timeout=2.0)
    store = DirectJobStore(client)
    store.heartbeat("w1", "b1", ["default"])
    client.script_flush()
    assert store.live_workers("default", 60_000) == 1  # NOSCRIPT, load, call again


def test_each_thread_has_its_own_connection(redis_server) -> None:
    store = DirectJobStore(make_client(redis_server.url, timeout=2.0))
    mine = store._connection()
    theirs: list[object] = []
    thread = threading.Thread(target=lambda: theirs.append(store._connection()))
    thread.start()
    thread.join()
    assert store._connection() is mine and theirs[0] is not mine


def test_a_lost_server_fails_the_call_and_the_next_one_tries_to_connect(redis_server) -> None:
    store = DirectJobStore(make_client(redis_server.url, timeout=1.0))
    store.heartbeat("w1", "b1", ["default"])
    redis_server.kill()
    with pytest.raises(redis.ConnectionError):
        store.live_workers("default", 60_000)
    with pytest.raises(ConnectFailed):  # nothing was sent: the outcome is known
        store.live_workers("default", 60_000)


def test_a_value_redis_cannot_take_gets_redis_pys_error_and_the_connection_stays_usable(
    redis_server,
) -> None:
    store = DirectJobStore(make_client(redis_server.url, timeout=2.0))
    with pytest.raises(redis.DataError):  # hiredis refuses a bool; redis-py's packer says why
        store.take_lease("lease", True, 10_000)  # type: ignore[arg-type]
    assert store.take_lease("lease", "me", 10_000) is True

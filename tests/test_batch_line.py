"""BatchLine: dispatch_many's enqueue_batch calls split into send and read on one pooled
connection, the next batch made in between (real Redis)."""

from __future__ import annotations

import pytest
import redis

from jobyard.queue import keys
from jobyard.queue.client import ConnectFailed, make_client
from jobyard.queue.store import BatchLine, JobStore, Reply


def _store(redis_server, timeout: float = 2.0) -> JobStore:
    store = JobStore(make_client(redis_server.url, timeout=timeout))
    store.heartbeat("w1", "b1", ["default"])  # a live worker for the queue
    return store


def _batch(*job_ids: str) -> tuple[list[str], list[object]]:
    args: list[object] = []
    for job_id in job_ids:
        args += ("system.echo", f"m-{job_id}", f"data-{job_id}".encode(), "")
    return [keys.job(job_id) for job_id in job_ids], args


def _send(store: JobStore, line: BatchLine, *job_ids: str) -> None:
    job_keys, args = _batch(*job_ids)
    line.send(store.enqueue_batch_call("default", "default", 60_000, job_keys, args))


def test_replies_and_writes_are_enqueue_batch_s(redis_server) -> None:
    store = _store(redis_server)
    line = store.batch_line()
    try:
        _send(store, line, "a", "b")
        assert line.read() is None  # every job new and enqueued
        _send(store, line, "c", "a")
        assert line.read() == [Reply("enqueued"), Reply("exists", "dramatiq", "queued")]
    finally:
        line.close()
    client = store.client
    assert client.lrange(keys.dramatiq_queue("default"), 0, -1) == [b"m-a", b"m-b", b"m-c"]
    assert client.hget(keys.job("a"), "rmid") == b"m-a"


def test_one_call_in_flight_at_a_time(redis_server) -> None:
    store = _store(redis_server)
    line = store.batch_line()
    try:
        with pytest.raises(RuntimeError):
            line.read()
        _send(store, line, "a")
        with pytest.raises(RuntimeError):
            _send(store, line, "b")
        assert line.read() is None
    finally:
        line.close()


def test_a_flushed_script_is_loaded_again_and_the_batch_runs_once(redis_server) -> None:
    store = _store(redis_server)
    store.client.script_flush()
    line = store.batch_line()
    try:
        _send(store, line, "a", "b")
        assert line.read() is None  # NOSCRIPT, load, the call again
    finally:
        line.close()
    assert store.client.llen(keys.dramatiq_queue("default")) == 2


def test_an_error_reply_is_raised_from_read_and_the_line_goes_on(redis_server) -> None:
    store = _store(redis_server)
    line = store.batch_line()
    store.client.config_set("maxmemory", 1)  # every write refused: it ran nothing
    try:
        _send(store, line, "a")
        with pytest.raises(redis.ResponseError):
            line.read()
        store.client.config_set("maxmemory", 0)
        _send(store, line, "b")
        assert line.read() is None
    finally:
        store.client.config_set("maxmemory", 0)
        line.close()
    assert store.client.lrange(keys.dramatiq_queue("default"), 0, -1) == [b"m-b"]


def test_a_lost_server_fails_the_read_and_a_dead_one_the_connect(redis_server) -> None:
    store = _store(redis_server, timeout=1.0)
    line = store.batch_line()
    try:
        redis_server.pause()  # killed as it stands: it never answers "a" (kill would resume it)
        _send(store, line, "a")
        redis_server.kill_paused()
        with pytest.raises(redis.ConnectionError) as lost:
            line.read()  # sent: Redis may have run it (ambiguous)
        assert not isinstance(lost.value, ConnectFailed)
        with pytest.raises(ConnectFailed):  # nothing was sent: the outcome is known
            _send(store, line, "b")
    finally:
        line.close()


def test_closing_with_a_reply_unread_never_hands_it_to_another_command(redis_server) -> None:
    store = _store(redis_server)
    line = store.batch_line()
    _send(store, line, "a")
    line.close()  # the reply is still on its way: that connection is dropped
    assert store.client.get("nothing-here") is None  # not "enqueued"'s reply
    assert store.client.ping() is True

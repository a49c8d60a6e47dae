"""A client that finds another server behind its address (a replica promoted by a failover, a
restart) marks it: `jobyard:lost_writes_before`, which makes the runs of jobs dispatched before
then read the step journal too (jobyard.lua `may_have_lost`, issue 31 item 3)."""

from __future__ import annotations

import time

from jobyard.queue import keys
from jobyard.queue.client import make_client
from tests.support import RedisServer


def test_a_new_server_at_the_same_address_is_marked_and_the_first_one_is_not(
    redis_server: RedisServer,
) -> None:
    client = make_client(redis_server.url, timeout=2)
    assert client.ping()
    assert client.get(keys.lost_writes_before()) is None  # the first server this process saw
    redis_server.kill()
    redis_server.start()  # another server (another run_id) on the same port, empty
    before = time.time() * 1000
    client.connection_pool.disconnect()  # as a failover drops the connections
    assert client.ping()
    marked = int(client.get(keys.lost_writes_before()) or 0)
    assert before - 1000 <= marked <= time.time() * 1000 + 1000
    client.connection_pool.disconnect()  # the same server again: not marked anew
    client.delete(keys.lost_writes_before())
    assert client.ping()
    assert client.get(keys.lost_writes_before()) is None

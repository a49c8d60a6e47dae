"""Job and message ids are drawn from a per-process pool (one read of the random source per
500): a forked child (a pre-forking web server's worker) must never hand out its parent's."""

from __future__ import annotations

import os

from jobyard.queue.messages import random_id, random_ids


def test_ids_look_like_token_hex_and_do_not_repeat() -> None:
    ids = [random_id() for _ in range(1200)] + random_ids(50)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_forked_child_draws_ids_of_its_own() -> None:
    random_id()  # the pool is full now, and would be copied into the child
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's side
        os.write(write_end, random_id().encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    from_child = os.read(read_end, 64).decode()
    os.close(read_end)
    assert from_child != random_id()

"""Job ids, and the random ids engines give their messages: made here, where every engine and
every caller (the dispatcher, Django, the CLI) can reach them without importing an engine."""

from __future__ import annotations

import os
import time

IDS_AT_ONCE = 500  # ids read from the system's random source at a time (see random_id)


def random_ids(count: int) -> list[str]:
    """`count` ids as `secrets.token_hex(16)` makes them, from one read of the system's random
    source (each read is a system call; a bulk dispatch needs two ids per job)."""
    text = os.urandom(16 * count).hex()
    return [text[at : at + 32] for at in range(0, 32 * count, 32)]


_id_pool: list[str] = []
# A forked child (a pre-forking web server's worker) must not hand out its parent's ids again.
os.register_at_fork(after_in_child=_id_pool.clear)


def random_id() -> str:
    """One id as `secrets.token_hex(16)` makes it, drawn from ids read IDS_AT_ONCE at a time."""
    try:
        return _id_pool.pop()
    except IndexError:
        _id_pool.extend(random_ids(IDS_AT_ONCE))
        return _id_pool.pop()


def new_job_id() -> str:
    """A job id: 32 hex digits, the first 12 the time in ms, the rest (80 bits) random, as a
    UUIDv7 orders them. Ids made later sort later, so the job log's primary key grows at its
    right edge instead of at random pages (measured, 80,000 finished jobs: 29.5 -> 19.5 us of
    PostgreSQL CPU per job)."""
    return f"{time.time_ns() // 1_000_000:012x}{random_id()[12:]}"


def new_job_ids(count: int) -> list[str]:
    """`count` ids as `new_job_id` makes them, from one read of the random source."""
    stamp = f"{time.time_ns() // 1_000_000:012x}"
    text = os.urandom(10 * count).hex()
    return [stamp + text[at : at + 20] for at in range(0, 20 * count, 20)]

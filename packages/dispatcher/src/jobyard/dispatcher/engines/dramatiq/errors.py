"""redis errors -> the dispatcher's own, in one place (as httpx maps httpcore's)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis

from jobyard.dispatcher.errors import EngineUnavailable
from jobyard.queue.client import ConnectFailed

ENGINE = "dramatiq"


@contextlib.contextmanager
def map_redis_errors() -> Iterator[None]:
    """A failure to connect proves the command never reached Redis; a connection lost or a
    reply timed out after sending may come after Redis ran it (ambiguous). An error reply
    (OOM, BUSY, READONLY...) means it did not run."""
    try:
        yield
    except ConnectFailed as exc:
        raise EngineUnavailable(ENGINE, f"cannot connect to Redis: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise EngineUnavailable(ENGINE, f"{type(exc).__name__}: {exc}", ambiguous=True) from exc
    except redis.RedisError as exc:
        raise EngineUnavailable(ENGINE, f"{type(exc).__name__}: {exc}") from exc

"""The process's Redis client: tight timeouts and no client-side retries.

redis-py's defaults retry and wait seconds on a dead server; a web request must learn in
milliseconds that Redis is gone, so the dispatcher can go to Temporal instead.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from jobyard.job_engine import env

_clients: dict[tuple[str, float], redis.Redis] = {}
_lock = threading.Lock()


class ConnectFailed(redis.ConnectionError):
    """Connecting (or the handshake) failed, so the command was never sent: its outcome is
    known. Any other connection or timeout error may come after Redis ran the command."""


class _RaisesConnectFailed:
    def connect(self) -> None:
        try:
            super().connect()  # type: ignore[misc]
        except redis.RedisError as exc:
            raise ConnectFailed(str(exc)) from exc


class _Connection(_RaisesConnectFailed, redis.Connection):
    pass


class _SSLConnection(_RaisesConnectFailed, redis.SSLConnection):
    pass


class _UnixConnection(_RaisesConnectFailed, redis.UnixDomainSocketConnection):
    pass


_CONNECTIONS: dict[str, type[_RaisesConnectFailed]] = {
    "redis": _Connection,
    "rediss": _SSLConnection,
    "unix": _UnixConnection,
}


def redis_url() -> str:
    return env.get_str(env.REDIS_URL)


def make_client(url: str | None = None, *, timeout: float | None = None) -> redis.Redis:
    """A new client; `timeout` seconds bounds connect and every reply."""
    timeout = env.get_float(env.REDIS_TIMEOUT) if timeout is None else timeout
    url = url or redis_url()
    extra: dict[str, Any] = {}
    connection_class = _CONNECTIONS.get(urlparse(url).scheme)
    if connection_class is not None:
        extra["connection_class"] = connection_class
    return redis.Redis.from_url(
        url,
        **extra,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        socket_keepalive=True,
    )


def get_client(url: str | None = None, *, timeout: float | None = None) -> redis.Redis:
    """The shared client for (url, timeout), created once per process."""
    url = url or redis_url()
    timeout = env.get_float(env.REDIS_TIMEOUT) if timeout is None else timeout
    key = (url, timeout)
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.setdefault(key, make_client(url, timeout=timeout))
    return client


def reset_clients() -> None:
    """Forget cached clients (after fork, or when tests change REDIS_URL)."""
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()

"""The process's Redis client: tight timeouts and no client-side retries.

redis-py's defaults retry and wait seconds on a dead server; a web request must learn in
milliseconds that Redis is gone, so the dispatcher can go to Temporal instead.

Every Redis client jobyard makes comes from here. A `redis+sentinel://` REDIS_URL
(jobyard.queue.redis_url) gives a client on redis-py's SentinelConnectionPool: each new
connection asks Sentinel for the primary, so after a failover the next connect reaches the
promoted replica; a READONLY reply (a demoted primary still connected to) drops the
connection so that the next one asks Sentinel again.
"""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from jobyard.job_engine import env
from jobyard.queue import keys
from jobyard.queue.redis_url import SentinelUrl, check_redis_url, is_sentinel, parse_sentinel_url

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


class DemotedPrimary(ConnectFailed):
    """READONLY: the server is a replica now (a failover demoted it), so it ran nothing. The
    connection is dropped; the next one asks Sentinel (or DNS) for the primary again. A
    ConnectFailed, as its outcome is as certain: the dispatcher falls back to Temporal cleanly."""


class _FollowsThePrimary:
    """A connection that, once dropped, connects again only through `connect()`: redis-py's
    `send_packed_command` reconnects to the last address by itself, which after a failover is
    the old primary (Sentinel's connection asks Sentinel only in `connect()`); and a failed
    reconnect there is then ConnectFailed, as the command was never sent."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:  # type: ignore[attr-defined]
            self.connect()  # type: ignore[attr-defined]
        super().send_packed_command(command, check_health)  # type: ignore[misc]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            # Connection's own read_response, not SentinelManagedConnection's, which turns
            # READONLY into a plain ConnectionError (an outcome the dispatcher cannot know).
            return redis.Connection.read_response(self, *args, **kwargs)  # type: ignore[arg-type]
        except redis.ReadOnlyError as exc:
            self.disconnect()  # type: ignore[attr-defined]
            raise DemotedPrimary(f"the primary was demoted to a replica: {exc}") from exc


#: The server each address was last found to be: (service or host:port, db) -> run_id.
_servers: dict[tuple[str, int], str] = {}
#: time.monotonic() when this process last found another server behind an address (None: never).
_server_changed_at: float | None = None


def server_changed_at() -> float | None:
    """When (time.monotonic()) this process last found another server behind an address it
    reached before: a failover (or a restart) that may have lost writes this process made, such
    as the acks of messages it ran (see jobyard.queue.worker.StrandedSweep). None if never."""
    return _server_changed_at


class _NoticesANewServer:
    """On each connect, which server this is (its run_id). Another server than the one this
    process last reached at the same address (a replica promoted by a failover, behind
    Sentinel or a managed endpoint's DNS; or a restart) may lack the old one's last writes: the
    connection marks it (`jobyard:lost_writes_before`, now), and a run of a job dispatched
    before then reads the step journal too (`may_have_lost` in jobyard.lua), so a step that
    returned on the old server is not run again. One INFO per new connection; pools keep
    theirs."""

    # redis-py (>= 6) calls this, not on_connect, when it opens a connection.
    def on_connect_check_health(self, check_health: bool = True) -> None:
        super().on_connect_check_health(check_health)  # type: ignore[misc]
        self.send_command("INFO", "server", "replication")  # type: ignore[attr-defined]
        info = self.read_response()  # type: ignore[attr-defined]
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("role", "").strip() != "master":
            return  # a replica (a demoted primary): the first write says so, READONLY
        run_id = fields.get("run_id", "").strip()
        address = (self._server_address(), int(getattr(self, "db", 0) or 0))
        previous = _servers.get(address)
        _servers[address] = run_id
        if previous is not None and previous != run_id:
            global _server_changed_at
            _server_changed_at = time.monotonic()
            self.send_command("SET", keys.lost_writes_before(), int(time.time() * 1000))  # type: ignore[attr-defined]
            self.read_response()  # type: ignore[attr-defined]

    def _server_address(self) -> str:
        pool = getattr(self, "connection_pool", None)
        service = getattr(pool, "service_name", None)
        if service:
            return f"sentinel:{service}"
        return f"{getattr(self, 'host', '')}:{getattr(self, 'port', '')}"


class _Connection(_RaisesConnectFailed, _FollowsThePrimary, _NoticesANewServer, redis.Connection):
    pass


class _SSLConnection(
    _RaisesConnectFailed, _FollowsThePrimary, _NoticesANewServer, redis.SSLConnection
):
    pass


class _SentinelConnection(
    _RaisesConnectFailed, _FollowsThePrimary, _NoticesANewServer, SentinelManagedConnection
):
    pass


class _SentinelSSLConnection(
    _RaisesConnectFailed, _FollowsThePrimary, _NoticesANewServer, SentinelManagedSSLConnection
):
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


def _socket_options(timeout: float) -> dict[str, Any]:
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "socket_keepalive": True,
    }


def make_client(url: str | None = None, *, timeout: float | None = None) -> redis.Redis:
    """A new client; `timeout` seconds bounds connect and every reply."""
    timeout = env.get_float(env.REDIS_TIMEOUT) if timeout is None else timeout
    url = url or redis_url()
    check_redis_url(url)
    if is_sentinel(url):
        return _sentinel_client(parse_sentinel_url(url), timeout)
    extra: dict[str, Any] = {}
    connection_class = _CONNECTIONS.get(urlparse(url).scheme)
    if connection_class is not None:
        extra["connection_class"] = connection_class
    return redis.Redis.from_url(
        url, **extra, **_socket_options(timeout), retry_on_timeout=False, health_check_interval=0
    )


def _sentinel_client(parsed: SentinelUrl, timeout: float) -> redis.Redis:
    """The primary's client through Sentinel (redis-py's discovery, our connection classes)."""
    tls: dict[str, Any] = {"ssl": True, **parsed.ssl_options} if parsed.ssl else {}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        parsed.sentinels,
        sentinel_kwargs={
            **_socket_options(timeout),
            "username": parsed.sentinel_username,
            "password": parsed.sentinel_password,
            **tls,
        },
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        parsed.service,
        connection_pool_class=SentinelConnectionPool,
        connection_class=_SentinelSSLConnection if parsed.ssl else _SentinelConnection,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        **parsed.ssl_options,
        **_socket_options(timeout),
        health_check_interval=0,
    )
    return client


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

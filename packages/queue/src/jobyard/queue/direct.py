"""A JobStore for worker processes whose script calls skip redis-py's per-command machinery.

A worker makes one jobyard.lua call per job (`complete`, or `start`/`step`/`finish`). Through
`Redis.evalsha` each costs about 30 us of client CPU beyond the round trip itself (measured with
redis-py 8: the pool's lock and its `can_read` poll, a syscall, the retry wrapper, the
observability hooks), as much again as the rest of a short job's bookkeeping. Here each thread
keeps one connection of its own, made from the client's pool settings (same server, timeouts,
`ConnectFailed` on a failed connect), and sends EVALSHA on it directly.

Errors are what they were: redis-py's Connection disconnects itself on any error while sending
or reading (a half-read reply is never reused) and the next call reconnects; a reply error
(NOSCRIPT, a script error) leaves the connection clean. There are no client-side retries to
lose: jobyard's clients make none (jobyard.queue.client).
"""

from __future__ import annotations

import threading
from typing import Any

import hiredis
import redis

from jobyard.queue.store import JobStore


class DirectJobStore(JobStore):
    def __init__(
        self, client: redis.Redis, *, log_changes: bool = False, check_closed: bool = False
    ) -> None:
        """`check_closed`: before each call, look whether the server closed the connection (as
        redis-py's pool does, one poll), and connect again if so. A dispatcher needs it: a call
        sent on a closed connection fails after sending, which is ambiguous (did Redis run it?),
        where a failed connect proves it did not, and the job goes to Temporal cleanly."""
        super().__init__(client, log_changes=log_changes)
        self._local = threading.local()
        self._check_closed = check_closed

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            pool = self.client.connection_pool
            connection = self._local.connection = pool.connection_class(**pool.connection_kwargs)
        return connection

    def _evalsha(self, sha: str, keys_: list[str], args: tuple[Any, ...]) -> Any:
        connection = self._connection()
        if connection._sock is not None and self._check_closed and _closed(connection):
            connection.disconnect()
        if connection._sock is None:  # connect() itself, which raises ConnectFailed on failure
            connection.connect()
        _send(connection, ("EVALSHA", sha, len(keys_), *keys_, *args))
        return connection.read_response()


def _send(connection: Any, command: tuple[Any, ...]) -> None:
    """redis-py's `send_packed_command`, errors and all, with the command packed by hiredis in
    one C call (redis-py's packer costs a worker's script call about 7 us more)."""
    try:
        packed = hiredis.pack_command(command)
    except TypeError:  # a value hiredis cannot pack: redis-py's packer says why (DataError)
        connection.send_packed_command(connection.pack_command(*command), check_health=False)
        return
    try:
        connection._sock.sendall(packed)
    except TimeoutError as exc:
        connection.disconnect()
        raise redis.TimeoutError("Timeout writing to socket") from exc
    except OSError as exc:
        connection.disconnect()
        raise redis.ConnectionError(f"Error while writing to socket: {exc.args}") from exc
    except BaseException:
        connection.disconnect()  # a half-sent command must not be followed by another
        raise


def _closed(connection: Any) -> bool:
    """Whether the server closed the connection (or left unread data: never, between two of
    our calls); a poll, no wait."""
    try:
        return bool(connection.can_read(timeout=0))
    except redis.ConnectionError:
        return True

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

A worker's store (`group_calls=True`) also lets calls made at the same moment by several of the
process's threads share one round trip (`CallGroup`): each call still gets its own reply, or
its own error.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import hiredis
import redis

from jobyard.queue.store import JobStore

log = logging.getLogger("jobyard.worker")


class DirectJobStore(JobStore):
    def __init__(
        self,
        client: redis.Redis,
        *,
        log_changes: bool = False,
        check_closed: bool = False,
        group_calls: bool = False,
    ) -> None:
        """`check_closed`: before each call, look whether the server closed the connection (as
        redis-py's pool does, one poll), and connect again if so. A dispatcher needs it: a call
        sent on a closed connection fails after sending, which is ambiguous (did Redis run it?),
        where a failed connect proves it did not, and the job goes to Temporal cleanly.
        `group_calls`: the threads' concurrent calls share round trips (`CallGroup`)."""
        super().__init__(client, log_changes=log_changes)
        self._local = threading.local()
        self._check_closed = check_closed
        self._group = CallGroup(self._new_connection, _stall(client)) if group_calls else None

    def _new_connection(self) -> Any:
        pool = self.client.connection_pool
        return pool.connection_class(**pool.connection_kwargs)

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._new_connection()
        return connection

    def _evalsha(self, sha: str, keys_: list[str], args: tuple[Any, ...]) -> Any:
        if self._group is not None:
            return self._group.call(("EVALSHA", sha, len(keys_), *keys_, *args))
        connection = self._connection()
        if connection._sock is not None and self._check_closed and _closed(connection):
            connection.disconnect()
        if connection._sock is None:  # connect() itself, which raises ConnectFailed on failure
            connection.connect()
        _send(connection, ("EVALSHA", sha, len(keys_), *keys_, *args))
        return connection.read_response()


def _stall(client: redis.Redis) -> float:
    """CallGroup's `stall` for a client: a few of its socket timeouts (a reply comes within one,
    or its round trip fails), and never under 10 s."""
    timeout = client.connection_pool.connection_kwargs.get("socket_timeout") or 7.5
    return max(10.0, 4 * float(timeout))


def _send(connection: Any, command: tuple[Any, ...]) -> None:
    """redis-py's `send_packed_command`, errors and all, with the command packed by hiredis."""
    _sendall(connection, _pack(connection, command))


def _pack(connection: Any, command: tuple[Any, ...]) -> bytes:
    """The command packed by hiredis in one C call (redis-py's packer costs a worker's script
    call about 7 us more); a value hiredis cannot pack goes through redis-py's packer, which
    says why (DataError)."""
    try:
        packed: bytes = hiredis.pack_command(command)
        return packed
    except TypeError:
        return b"".join(connection.pack_command(*command))


def _sendall(connection: Any, packed: bytes) -> None:
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


#: A call's reply before it has one (a script may reply nil: None).
_UNANSWERED: Any = object()
#: Seconds between a waiting call's looks at its own state. Being woken is only a hint: a thread
#: interrupted mid-way (Dramatiq's time limit) may skip a wake-up, never a state change, so a
#: waiter that looks again takes its reply or the lead by itself; and an interruption of a waiting
#: thread lands within this long.
_LOOK_AGAIN = 0.05


class _Call:
    """One thread's command in a `CallGroup`, and its answer."""

    __slots__ = ("answered", "command", "error", "leads", "reply", "sent_in")

    def __init__(self, command: tuple[Any, ...]) -> None:
        self.command = command
        self.reply: Any = _UNANSWERED
        self.error: BaseException | None = None
        self.leads = False  # handed the sending of the next round trip
        self.sent_in: int | None = None  # the generation of the lead that took it (see CallGroup)
        # Released (a wake-up) when the call is answered or made the leader.
        self.answered = threading.Lock()
        self.answered.acquire()

    @property
    def pending(self) -> bool:
        return self.error is None and self.reply is _UNANSWERED

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.reply


class CallGroup:
    """Script calls of a process's threads, made at the same moment, share one round trip.

    A worker's no-op job spends about 45 us of client CPU on its one script call sent alone
    (a send and a receive syscall, and a wake-up), and 10-15 us when four go together. The
    first thread to call while no round trip is under way leads: it sends every call waiting
    (its own among them) in one write, reads their replies in order, and hands each its own.
    Calls made meanwhile wait, and the first of them leads the next round trip. No call waits
    for a batch to fill: a call alone is sent at once.

    Errors stay each call's own: an error reply (NOSCRIPT, a script error) goes to its call
    only, and the connection stays usable. A lost connection or a timeout fails every call not
    yet answered, as it would have failed each alone (what Redis ran is unknown: the caller's
    ambiguity is the same), and the next round trip connects again.

    Dramatiq's time limit raises an exception in a job's thread from another thread, wherever
    that thread is: after any call returns, at any function's entry. So the group's state (who
    leads, what is answered) changes only under its lock in code with no call in it, inside the
    `try` whose `finally` hands the lead on; wake-ups are hints (see _LOOK_AGAIN). An interrupted
    thread's call is withdrawn if it was not sent (it leaves the lead to the next call), and gets
    its exception; one sent is answered to nobody; the other calls of its round trip get a
    ConnectionError if the interruption came before their replies were read.

    Should a lead still be lost, whatever the cause (a leading thread gone without handing it
    on), the calls do not wait for good: a call that has waited `stall` seconds while no reply
    came to anyone takes the lead itself, on a new connection (a generation later: the lost
    leader, if it ever comes back, hands nothing on), and a call the lost leader had taken gets
    a ConnectionError. A process stopped meanwhile (SIGSTOP) does not count as waiting.
    """

    def __init__(self, connect: Callable[[], Any], stall: float = 30.0) -> None:
        """`stall`: seconds without a reply, longer than any live round trip takes (a reply is
        read within the socket timeout)."""
        self._connect = connect
        self._connection: Any = None
        self._lock = threading.Lock()
        self._waiting: list[_Call] = []
        self._sending = False
        self._stall = stall
        self._generation = 0  # of the lead: a lead taken over from a lost one is the next
        self._replies = 0  # replies read, ever: what shows that a lead is alive

    def call(self, command: tuple[Any, ...]) -> Any:
        call = _Call(command)
        batch: list[_Call] = []
        successor: _Call | None = None
        generation: int | None = None  # of this call's lead, once it took its batch
        try:
            with self._lock:
                self._waiting.append(call)
                if not self._sending:
                    self._sending = call.leads = True
            self._wait(call)
            if call.leads:
                with self._lock:
                    batch, self._waiting = self._waiting, []
                    generation = self._generation
                self._round_trip(batch, generation)
        except BaseException as exc:
            for sent in batch:
                if sent.pending:
                    sent.error = _lost(exc)
            if not isinstance(exc, Exception) or call not in batch:
                raise  # an interruption, or this call's own error raised before it was sent
        finally:
            # No call between here and the end of the `with`: see the class's docstring.
            with self._lock:
                if call in self._waiting:  # not sent: it leaves (an interruption)
                    self._waiting.remove(call)
                if call.leads and generation in (None, self._generation):  # not taken over
                    successor = self._waiting[0] if self._waiting else None
                    if successor is None:
                        self._sending = False
                    else:
                        successor.leads = True
            if call.leads:
                _wake(batch, call, successor)
        return call.result()

    def _wait(self, call: _Call) -> None:
        """Until the call is answered or leads; see the class's docstring for `stall`."""
        seen, sent, waited = self._replies, call.sent_in, 0.0
        while not call.leads and call.pending:
            began = time.monotonic()
            if call.answered.acquire(True, _LOOK_AGAIN):
                continue
            elapsed = time.monotonic() - began
            if call.sent_in != sent:  # taken into a round trip: its time starts now
                sent, waited = call.sent_in, 0.0
            elif sent is None and self._replies != seen:  # the lead it waits for is alive
                seen, waited = self._replies, 0.0
            elif elapsed < 1.0:  # a longer gap is the process stopped, not a wait
                waited += elapsed
            if waited >= self._stall:
                self._recover(call)
                waited = 0.0

    def _recover(self, call: _Call) -> None:
        """A lead lost: this call takes it over, or fails if the lost leader had taken it."""
        with self._lock:
            if not call.pending or call.leads:
                return
            if call not in self._waiting:  # sent: its round trip has taken `stall` so far
                if call.sent_in is not None:
                    call.error = redis.ConnectionError("round trip lost: no reply in time")
                return
            if any(c.leads for c in self._waiting):
                return  # handed on already: that call is about to lead
            self._generation += 1
            self._connection = None  # the lost leader's may be mid-reply
            self._sending = call.leads = True
            log.warning(
                "a Redis round trip made no progress in %g s: its lead taken over", self._stall
            )

    def _round_trip(self, batch: list[_Call], generation: int) -> None:
        for call in batch:
            call.sent_in = generation
        connection = self._connected(generation)
        try:
            sent = self._send(connection, batch)
            for call in sent:
                try:
                    call.reply = connection.read_response()
                except redis.ResponseError as exc:  # this call's own: the connection is clean
                    call.error = exc
                self._replies += 1
        except BaseException:
            connection.disconnect()  # a reply half read must never reach another call
            raise

    def _connected(self, generation: int) -> Any:
        connection = self._connection
        if connection is None:
            connection = self._connect()
            with self._lock:  # a lost lead that comes back keeps its connection to itself
                if generation == self._generation:
                    self._connection = connection
        if connection._sock is None:  # connect() itself: ConnectFailed on failure
            connection.connect()
        return connection

    @staticmethod
    def _send(connection: Any, batch: list[_Call]) -> list[_Call]:
        """Writes the batch's commands in one write; returns the calls sent (one with a value
        Redis cannot take gets redis-py's DataError, and is not sent)."""
        packed: list[bytes] = []
        sent: list[_Call] = []
        for call in batch:
            try:
                packed.append(_pack(connection, call.command))
            except redis.DataError as exc:
                call.error = exc
                continue
            sent.append(call)
        if sent:
            _sendall(connection, b"".join(packed))
        return sent


def _wake(batch: list[_Call], leader: _Call, successor: _Call | None) -> None:
    """Wakes the calls a round trip answered (not the leader's own: its thread is awake) and
    the next leader. Each lock is released once: a call is in one batch, and made the leader
    at most once."""
    for call in batch:
        if call is not leader:
            call.answered.release()
    if successor is not None:
        successor.answered.release()


def _lost(failure: BaseException | None) -> BaseException:
    """The error of a call its round trip left unanswered: a copy of Redis's error (each
    thread raises its own), or a ConnectionError when the leading thread was interrupted."""
    if isinstance(failure, redis.RedisError):
        lost = copy.copy(failure)
    else:
        reason = type(failure).__name__ if failure is not None else "not sent"
        lost = redis.ConnectionError(f"round trip interrupted: {reason}")
    lost.__cause__ = failure
    return lost

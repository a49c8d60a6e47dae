"""JobStore's commands of the dispatching side: enqueue (one job, or a batch, also on a
BatchLine), and the moves of a job between engines and states (handoff, cancel, replay,
rescue and the handoff list)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import hiredis
from redis.exceptions import NoScriptError

from jobyard.queue import keys
from jobyard.queue.store.script import _SCRIPT, EnqueueCall, Reply, ScriptStore, _text


class BatchJob(NamedTuple):
    """One new job of an `enqueue_many` batch."""

    job_id: str
    name: str
    redis_message_id: str
    message: bytes
    options_json: str  # the dispatch's options a replay must keep, as JSON ("" for none)


#: enqueue_many's common replies, decoded once (the client may or may not decode to str).
_BATCH_REPLIES: dict[Any, Reply] = {
    word: Reply(status)
    for status in ("enqueued", "no_workers")
    for word in (status, status.encode())
}
_ENQUEUED = Reply("enqueued")


def _batch_replies(replies: Any) -> list[Reply] | None:
    """An `enqueue_many` batch's replies from the script's: None for the batch's size (every
    job was new and is enqueued), else one per job, in order."""
    if isinstance(replies, int):
        return None
    return [
        _BATCH_REPLIES.get(reply) or Reply.decode(_text(reply).split(":", 2)) for reply in replies
    ]


class BatchLine:
    """`enqueue_many` calls split in two: `send` writes a call and returns, `read` waits for its
    reply, on one connection of the client's pool taken for the line's life. The caller makes
    its next batch between the two while Redis runs this one, in its own thread: a thread that
    waits for Redis instead must win the GIL back from the one making batches each time it
    wakes, which a busy thread holds for up to the interpreter's switch interval (5 ms). One
    call at a time is in flight (`read` before the next `send`).

    Errors are those of a call through `_call`: a failed connect raises ConnectFailed from
    `send` (nothing sent); a connection lost or a timeout from `send` or `read` is raised there
    and the connection is dropped; an error reply is raised from `read`. NOSCRIPT (a new or flushed
    server ran nothing) loads the script and makes the call again, as `_call` does."""

    def __init__(self, store: ScriptStore) -> None:
        self._store = store
        self._pool = store.client.connection_pool
        self._connection: Any = None
        self._sent: EnqueueCall | None = None

    def send(self, call: EnqueueCall) -> None:
        """Writes `call` (`JobStore.enqueue_batch_call`); returns without its reply."""
        if self._sent is not None:
            raise RuntimeError("read the reply of the call in flight before sending another")
        if self._connection is None:
            self._connection = self._pool.get_connection()  # connects: ConnectFailed if not
        self._write(call)
        self._sent = call

    def read(self) -> list[Reply] | None:
        """The reply of the call in flight: None when every job was new and is enqueued, else
        one per job, in order."""
        if self._sent is None:
            raise RuntimeError("no call in flight")
        call, self._sent = self._sent, None
        try:
            try:
                replies = self._connection.read_response()
            except NoScriptError:  # it ran nothing: load the script, then the call again
                self._store._sha = self._store.client.script_load(_SCRIPT)
                self._write(call)
                replies = self._connection.read_response()
        except BaseException:
            self._drop()
            raise
        return _batch_replies(replies)

    def close(self) -> None:
        if self._sent is not None:  # a reply never read: the connection is not reusable
            self._sent = None
            self._drop()
        if self._connection is not None:
            self._pool.release(self._connection)
            self._connection = None

    def _write(self, call: EnqueueCall) -> None:
        keys_, args = call
        # hiredis's packer itself: redis-py's wrapper first copies the arguments through a
        # Python check of each (a batch has five per job).
        command = [hiredis.pack_command(("EVALSHA", self._store._sha, len(keys_), *keys_, *args))]
        try:
            self._connection.send_packed_command(command, check_health=False)
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.disconnect()
            self._pool.release(self._connection)
            self._connection = None


class DispatchCommands(ScriptStore):
    def enqueue(
        self,
        job_id: str,
        name: str,
        queue: str,
        dramatiq_queue: str,
        redis_message_id: str,
        message: bytes,
        heartbeat_timeout_ms: int,
        options: dict[str, Any] | None = None,
        seq: int = 0,
        priority: int = 0,
        park: tuple[int, str, str] | None = None,
    ) -> Reply:
        """ "enqueued", "exists" (detail: the engine that owns the job, state: its state) or
        "no_workers" (the job is now recorded as Temporal's). `options`: the dispatch's options
        a replay of the job must keep. `priority` (not 0): the message waits in its band of
        `queue` (once due, if `dramatiq_queue` is the delay queue); 0 passes nothing more.
        `park`: (until ms, display_state, waiting_reason) of a job a flow-control limit holds
        at dispatch: its message waits in the queue's parked set (see jobyard.lua)."""
        job_keys = [
            keys.job(job_id),
            keys.workers(queue),
            keys.dramatiq_queue(dramatiq_queue),
            keys.dramatiq_messages(dramatiq_queue),
        ]
        band: tuple[Any, ...] = ()
        if priority or park:
            job_keys.append(keys.bands(queue))
            prefix = keys.band_prefix(queue) if dramatiq_queue == queue else ""
            band = (priority, prefix, keys.priority_channel(queue))
        if park:
            job_keys.append(keys.parked(queue))
            band += park
        reply = self._call(
            job_keys,
            "enqueue",
            job_id,
            redis_message_id,
            message,
            name,
            queue,
            heartbeat_timeout_ms,
            self.retention,
            json.dumps(options) if options else "",
            seq,
            *band,
        )
        return Reply.decode(reply)

    def enqueue_many(
        self,
        queue: str,
        dramatiq_queue: str,
        heartbeat_timeout_ms: int,
        jobs: Sequence[BatchJob],
    ) -> list[Reply]:
        """`enqueue` for a batch of new jobs on one queue, in one call; one reply per job, in
        order. The queue's liveness is read once for the batch."""
        args: list[Any] = []
        for job in jobs:
            args += (job.name, job.redis_message_id, job.message, job.options_json)
        job_keys = [keys.job(job.job_id) for job in jobs]
        keys_, call = self.enqueue_batch_call(
            queue, dramatiq_queue, heartbeat_timeout_ms, job_keys, args
        )
        replies = _batch_replies(self._call(keys_, *call))
        return [_ENQUEUED] * len(jobs) if replies is None else replies

    def enqueue_batch_call(
        self,
        queue: str,
        dramatiq_queue: str,
        heartbeat_timeout_ms: int,
        job_keys: list[str],
        job_args: list[Any],
    ) -> EnqueueCall:
        """The `enqueue_many` call of jobs given as it takes them (for a BatchLine): each job's
        key (`keys.job`), and four arguments per job in one list (name, redis message id,
        message, options JSON or "")."""
        keys_ = [
            keys.workers(queue),
            keys.dramatiq_queue(dramatiq_queue),
            keys.dramatiq_messages(dramatiq_queue),
            *job_keys,
        ]
        return keys_, ("enqueue_many", queue, heartbeat_timeout_ms, self.retention, *job_args)

    def batch_line(self) -> BatchLine:
        """A connection of the client's pool for a run of `enqueue_batch_call` calls whose
        replies are read after the next batch is made (see BatchLine); close it when done."""
        return BatchLine(self)

    def handoff(self, job_id: str, name: str, queue: str) -> Reply:
        """ "claimed" (now Temporal's) or "lost" (detail: the state Dramatiq has it in)."""
        delay_queue = keys.delayed(queue)
        reply = self._call(
            [
                keys.job(job_id),
                keys.dramatiq_queue(queue),
                keys.dramatiq_messages(queue),
                keys.dramatiq_queue(delay_queue),
                keys.dramatiq_messages(delay_queue),
            ],
            "handoff",
            name,
            queue,
            self.retention,
        )
        return Reply.decode(reply)

    def cancel(self, job_id: str, queue: str) -> Reply:
        """ "cancelled", "requested" (running: stops at its next step), "done" (detail: the final
        state), "temporal" (not Dramatiq's) or "missing"."""
        reply = self._call([keys.job(job_id), *self._queue_keys(queue)], "cancel", self.retention)
        return Reply.decode(reply)

    def replay(
        self, job_id: str, queue: str, next_seq: int, redis_message_id: str, message: bytes
    ) -> Reply:
        """ "ok", "active" (detail: its state), "temporal", "missing" or "conflict" (replayed
        concurrently)."""
        reply = self._call(
            [keys.job(job_id), keys.dramatiq_queue(queue), keys.dramatiq_messages(queue)],
            "replay",
            next_seq,
            redis_message_id,
            message,
        )
        return Reply.decode(reply)

    def rescue(self, queue: str, heartbeat_timeout_ms: int, limit: int = 500) -> int:
        """Move the waiting and delayed jobs of a queue with no live worker to the handoff
        list (to start them on Temporal)."""
        reply = self._call(
            [
                keys.workers(queue),
                *self._queue_keys(queue),
                keys.handoff(),
                keys.bands(queue),
                keys.parked(queue),
            ],
            "rescue",
            heartbeat_timeout_ms,
            limit,
            keys.job_prefix(),
            keys.band_prefix(queue),
        )
        return int(reply)

    def handoffs(self, limit: int = 500) -> list[bytes]:
        return cast(list[bytes], self.client.lrange(keys.handoff(), 0, limit - 1))

    def handoff_done(self, message: bytes) -> None:
        self.client.lrem(keys.handoff(), 1, message)  # type: ignore[arg-type]  # bytes work

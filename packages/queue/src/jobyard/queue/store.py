"""Python face of jobyard.lua: job records, step results and worker liveness in Redis."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple, cast

import hiredis
import redis
from redis.exceptions import NoScriptError

from jobyard.job_engine import env
from jobyard.queue import keys

_SCRIPT = resources.files("jobyard.queue").joinpath("jobyard.lua").read_text()
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()


@dataclass(frozen=True)
class Delivery:
    """The Dramatiq message being processed, so our calls can ack it (see `ack` in the Lua)."""

    broker_id: str
    queue: str
    redis_message_id: str

    def keys(self) -> list[str]:
        return [keys.dramatiq_acks(self.broker_id, self.queue), keys.dramatiq_messages(self.queue)]


NO_DELIVERY = Delivery("", "", "")


class BatchJob(NamedTuple):
    """One new job of an `enqueue_many` batch."""

    job_id: str
    name: str
    redis_message_id: str
    message: bytes
    options_json: str  # the dispatch's options a replay must keep, as JSON ("" for none)


class Reply(NamedTuple):
    """A Lua command's multi-value reply: a status word and, for some statuses, one detail
    (enqueue "exists": the owning engine; handoff "lost", cancel "done", replay "active": the
    job's state). A NamedTuple: built once per dispatch, where a frozen dataclass costs more."""

    status: str
    detail: str | None = None
    state: str | None = None

    @classmethod
    def decode(cls, raw: Any) -> Reply:
        if isinstance(raw, list | tuple):
            return cls(*[_text(value) for value in raw[:3]])
        return cls(_text(raw))


#: enqueue_many's common replies, decoded once (the client may or may not decode to str).
_BATCH_REPLIES: dict[Any, Reply] = {
    word: Reply(status)
    for status in ("enqueued", "no_workers")
    for word in (status, status.encode())
}
_ENQUEUED = Reply("enqueued")


#: A jobyard.lua call: its keys, and its arguments (the command first).
EnqueueCall = tuple[list[str], tuple[Any, ...]]


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

    def __init__(self, store: JobStore) -> None:
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


@dataclass(frozen=True)
class QueueCounts:
    waiting: int  # on the queue, not fetched
    in_flight: int  # fetched by a worker, not acked
    delayed: int  # on the delay queue: retry backoffs, durable sleeps, dispatch delays


@dataclass
class StartResult:
    status: str  # ok | lost | stale | done | cancelled | throttled | exhausted
    attempts: int = 0
    started_at: float = 0.0  # unix seconds of the job's first start
    steps: dict[str, str] = field(default_factory=dict)
    retry_in_ms: int = 0
    died: str = ""  # exhausted: how the last process that ran the job died


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobStore:
    def __init__(self, client: redis.Redis, *, log_changes: bool = False) -> None:
        """`log_changes`: append every change this store makes to a job to the job log's outbox,
        for the shipper to write to the database (a worker's store, when the job log is on)."""
        self.client = client
        # Seconds a finished job's records stay in Redis (the job log keeps it for longer).
        self.retention = env.get_int(env.RECORD_RETENTION)
        self._sha = _SCRIPT_SHA
        self._events = [keys.job_log_events()] if log_changes else []

    @property
    def logs_changes(self) -> bool:
        return bool(self._events)

    def _call(self, keys_: list[str], *args: Any) -> Any:
        # EVALSHA directly: redis-py's Script wrapper costs a few microseconds a call, and
        # a worker makes one of these calls per job.
        try:
            return self._evalsha(self._sha, keys_, args)
        except NoScriptError:  # a new or flushed server: load the script once
            self._sha = self.client.script_load(_SCRIPT)
            return self._evalsha(self._sha, keys_, args)

    def _evalsha(self, sha: str, keys_: list[str], args: tuple[Any, ...]) -> Any:
        """One EVALSHA (jobyard.queue.direct sends it without redis-py's command machinery)."""
        return self.client.evalsha(sha, len(keys_), *keys_, *args)

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
    ) -> Reply:
        """ "enqueued", "exists" (detail: the engine that owns the job, state: its state) or
        "no_workers" (the job is now recorded as Temporal's). `options`: the dispatch's options
        a replay of the job must keep."""
        reply = self._call(
            [
                keys.job(job_id),
                keys.workers(queue),
                keys.dramatiq_queue(dramatiq_queue),
                keys.dramatiq_messages(dramatiq_queue),
            ],
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

    def start(
        self,
        job_id: str,
        job_name: str,
        seq: int,
        *,
        resume: bool,
        rate: tuple[int, int] | None,
        suspect_attempts: int = 0,
    ) -> StartResult:
        """`suspect_attempts`: for a suspect's message (see `reclaim`), the job's attempts: a
        suspect whose last run died alone with the last of them is "exhausted" (not started)."""
        calls, period_ms = rate or (0, 0)
        reply = self._call(
            [keys.job(job_id), keys.steps(job_id), keys.rate_prefix(job_name), *self._events],
            "start",
            seq,
            "1" if resume else "0",
            calls,
            period_ms,
            suspect_attempts,
        )
        status = _text(reply[0])
        if status == "throttled":
            return StartResult(status, retry_in_ms=int(reply[1]))
        if status == "exhausted":
            return StartResult(status, attempts=int(reply[1]), died=_text(reply[2]))
        if status != "ok":
            return StartResult(status)
        flat = [_text(v) for v in reply[3:]]
        steps = dict(zip(flat[::2], flat[1::2], strict=True))
        return StartResult(status, int(reply[1]), int(reply[2]) / 1000, steps)

    def record_step(
        self, job_id: str, seq: int, step: str, result_json: str, timing_json: str = ""
    ) -> str:
        """ "ok", "lost" (the job is not ours any more) or "cancel" (stop at this boundary).
        `timing_json`: when the step ran, kept beside it (STEP_TIMING_PREFIX) for the timeline."""
        reply = self._call(
            [keys.job(job_id), keys.steps(job_id)],
            "step",
            seq,
            step,
            result_json,
            self.retention,
            timing_json,
        )
        return _text(reply)

    def record_progress(self, job_id: str, seq: int, progress_json: str) -> bool:
        reply = self._call([keys.job(job_id), *self._events], "progress", seq, progress_json)
        return _text(reply) == "ok"

    def mark_running(self, job_id: str, seq: int) -> bool:
        """Show a run that is still before its first step as running (see jobyard.lua)."""
        return bool(self._call([keys.job(job_id), *self._events], "mark_running", seq))

    def finish(
        self,
        job_id: str,
        seq: int,
        state: str,
        *,
        result: Any = None,
        error: str = "",
        error_class: str = "",
        delivery: Delivery = NO_DELIVERY,
        payload: Any = None,
        traceback: str = "",
    ) -> bool:
        reply = self._call(
            [keys.job(job_id), keys.steps(job_id), *delivery.keys(), *self._events],
            "finish",
            seq,
            state,
            json.dumps(result),
            error,
            error_class,
            self.retention,
            delivery.redis_message_id,
            "" if payload is None else json.dumps(payload),
            traceback,
        )
        return _text(reply) == "ok"

    def complete(
        self, job_id: str, seq: int, *, resume: bool, result: Any, delivery: Delivery = NO_DELIVERY
    ) -> StartResult:
        """Start and finish a run that used no step, in one call; status "ok" or why not."""
        reply = self._call(
            [keys.job(job_id), keys.steps(job_id), *delivery.keys(), *self._events],
            "complete",
            seq,
            "1" if resume else "0",
            json.dumps(result),
            self.retention,
            delivery.redis_message_id,
        )
        status = _text(reply[0])
        if status != "ok":
            return StartResult(status)
        return StartResult(status, int(reply[1]), int(reply[2]) / 1000)

    def reschedule(
        self,
        job_id: str,
        seq: int,
        next_seq: int,
        state: str,
        delay_queue: str,
        redis_message_id: str,
        message: bytes,
        *,
        error: str = "",
        error_class: str = "",
        delivery: Delivery = NO_DELIVERY,
        run_at_ms: int = 0,
    ) -> bool:
        reply = self._call(
            [
                keys.job(job_id),
                keys.dramatiq_queue(delay_queue),
                keys.dramatiq_messages(delay_queue),
                *delivery.keys(),
                *self._events,
            ],
            "reschedule",
            seq,
            next_seq,
            state,
            redis_message_id,
            message,
            error,
            error_class,
            delivery.redis_message_id,
            run_at_ms,
        )
        return _text(reply) == "ok"

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

    def _queue_keys(self, queue: str) -> list[str]:
        delay_queue = keys.delayed(queue)
        return [
            keys.dramatiq_queue(queue),
            keys.dramatiq_messages(queue),
            keys.dramatiq_queue(delay_queue),
            keys.dramatiq_messages(delay_queue),
        ]

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
            [keys.workers(queue), *self._queue_keys(queue), keys.handoff()],
            "rescue",
            heartbeat_timeout_ms,
            limit,
            keys.job_prefix(),
        )
        return int(reply)

    def reclaim(
        self,
        queue: str,
        *,
        dead_before_ms: int = 0,
        stale_beat: str = "",
        dead: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Takes back the messages of `queue` (and its delay queue) held by dead Dramatiq
        brokers: those whose heartbeat is older than `dead_before_ms` (0: none; `stale_beat`
        says how they died), and `dead`, (broker id, how its process died) pairs. Live jobs'
        messages go to the suspects list (see `requeue_suspects`); returns how many."""
        delay_queue = keys.delayed(queue)
        reply = self._call(
            [keys.dramatiq_heartbeats(), *self._queue_keys(queue), keys.suspects(queue)],
            "reclaim",
            keys.dramatiq_acks_prefix(),
            queue,
            delay_queue,
            keys.job_prefix(),
            dead_before_ms,
            stale_beat,
            *[value for pair in dead for value in pair],
        )
        return int(reply)

    def suspects(self, queue: str) -> list[tuple[str, bytes | str | None]]:
        """The messages on `queue`'s suspects list: (message id, its data; None if gone)."""
        ids = [_text(i) for i in self.client.lrange(keys.suspects(queue), 0, -1)]
        if not ids:
            return []
        data = self.client.hmget(keys.dramatiq_messages(queue), ids)
        return list(zip(ids, data, strict=True))

    def requeue_suspects(self, queue: str, marked: Sequence[tuple[str, bytes]]) -> int:
        """Puts suspects' messages, (id, data marked as a suspect's), back on `queue`."""
        if not marked:
            return 0
        reply = self._call(
            [
                keys.suspects(queue),
                keys.dramatiq_queue(queue),
                keys.dramatiq_messages(queue),
            ],
            "requeue_suspects",
            *[value for pair in marked for value in pair],
        )
        return int(reply)

    def handoffs(self, limit: int = 500) -> list[bytes]:
        return cast(list[bytes], self.client.lrange(keys.handoff(), 0, limit - 1))

    def handoff_done(self, message: bytes) -> None:
        self.client.lrem(keys.handoff(), 1, message)  # type: ignore[arg-type]  # bytes work

    def heartbeat(self, worker_id: str, broker_id: str, queues: list[str]) -> int:
        worker_keys = [keys.workers(q) for q in queues]
        return int(
            self._call(
                [keys.dramatiq_heartbeats(), *worker_keys], "heartbeat", worker_id, broker_id
            )
        )

    def deregister(self, worker_id: str, queues: list[str]) -> None:
        self._call([keys.workers(q) for q in queues], "deregister", worker_id)

    def live_workers(self, queue: str, heartbeat_timeout_ms: int) -> int:
        return int(self._call([keys.workers(queue)], "live_workers", heartbeat_timeout_ms))

    def take_lease(self, name: str, holder: str, ms: int) -> bool:
        """Take or extend the lease `name` for `holder`; False while someone else holds it."""
        return bool(self._call([name], "lease", holder, ms))

    def job_log_entries(self, limit: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The oldest `limit` entries of the job log's outbox: (stream id, fields), in order."""
        entries = self.client.xrange(keys.job_log_events(), count=limit)
        return cast(list[tuple[bytes, dict[bytes, bytes]]], entries)

    def job_log_shipped(self, last_id: bytes) -> int:
        """Drops the outbox's entries up to `last_id`, once they are in the database. By id, not
        by count: an entry appended meanwhile has a higher id and stays."""
        milliseconds, sequence = _text(last_id).split("-")
        after = f"{milliseconds}-{int(sequence) + 1}"
        return int(self.client.xtrim(keys.job_log_events(), minid=after, approximate=False))

    def queue_counts(self, queue: str) -> QueueCounts:
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(keys.dramatiq_queue(queue))
        pipe.hlen(keys.dramatiq_messages(queue))
        pipe.hlen(keys.dramatiq_messages(keys.delayed(queue)))
        waiting, held, delayed = pipe.execute()
        # A queue's msgs hash holds waiting and fetched messages alike.
        return QueueCounts(waiting, max(0, held - waiting), delayed)

    def now(self) -> float:
        """Redis's clock, in unix seconds: the clock heartbeats are scored on."""
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    def heartbeats_since(self, queue: str, since: float) -> list[tuple[str, float]]:
        """(worker id, last heartbeat in unix seconds) of `queue`'s workers seen since `since`."""
        seen = self.client.zrangebyscore(keys.workers(queue), since * 1000, "+inf", withscores=True)
        return [(_text(member), float(score) / 1000) for member, score in cast(Any, seen)]

    def broker_heartbeats_since(self, since: float) -> list[float]:
        """Last beats (unix seconds) of the Dramatiq brokers seen since `since`: Dramatiq's own
        heartbeats, which its consumers refresh on every fetch."""
        seen = self.client.zrangebyscore(
            keys.dramatiq_heartbeats(), since * 1000, "+inf", withscores=True
        )
        return [float(score) / 1000 for _, score in cast(Any, seen)]

    def missing(self, job_ids: list[str]) -> list[str]:
        """Those of `job_ids` that have no record in Redis."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(keys.job(job_id))
        return [job_id for job_id, found in zip(job_ids, pipe.execute(), strict=True) if not found]

    def job_log_backlog(self) -> int:
        """How many job changes wait in the outbox for the job log's shipper."""
        return int(self.client.xlen(keys.job_log_events()))

    def get(self, job_id: str) -> dict[str, str] | None:
        raw = self.client.hgetall(keys.job(job_id))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}

    def restore_steps(self, job_id: str, steps: dict[str, str]) -> None:
        """Writes step results (JSON text) a Redis that restarted empty lost (see rescue)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(keys.steps(job_id), mapping=steps)  # type: ignore[arg-type]
        pipe.expire(keys.steps(job_id), self.retention)  # as the "step" command does
        pipe.execute()

    def steps(self, job_id: str) -> dict[str, Any]:
        raw = self.client.hgetall(keys.steps(job_id))
        return {_text(k): json.loads(v) for k, v in raw.items()}

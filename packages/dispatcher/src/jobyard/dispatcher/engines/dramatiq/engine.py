"""Dramatiq over Redis: one Lua call per operation (jobyard.queue's JobStore)."""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from jobyard.dispatcher.engines.base import (
    Cancellation,
    CancelStatus,
    Engine,
    NewJob,
    Orphan,
    QueueDepth,
    Release,
    ReleaseStatus,
    Replay,
    ReplayStatus,
    Submission,
    SubmitStatus,
    Submitted,
    WorkerInfo,
    as_submission,
)
from jobyard.dispatcher.engines.dramatiq.errors import map_redis_errors
from jobyard.dispatcher.errors import EngineUnavailable
from jobyard.dispatcher.models import NO_OPTIONS, DispatchOptions, EngineName, JobStatus
from jobyard.job_engine import crypto
from jobyard.job_engine.queues import queue_names
from jobyard.job_engine.states import FINAL_STATES, UNFINISHED_STATES, JobState
from jobyard.queue import keys
from jobyard.queue.messages import (
    EncodedMessage,
    NewJobMessages,
    decode_job_message,
    encode_job_message,
)
from jobyard.queue.store import BatchLine, JobStore, Reply

if TYPE_CHECKING:
    from jobyard.queue.broker import DeadWorkerSweeper

#: States in which a job may be waiting for a delayed message (a sleep, a retry, a throttle).
_WAITING = UNFINISHED_STATES

log = logging.getLogger("jobyard.rescue")

_CANCEL = {
    "cancelled": CancelStatus.CANCELLED,  # the Lua call's replies, not job states
    "requested": CancelStatus.REQUESTED,
    "done": CancelStatus.FINISHED,
    "temporal": CancelStatus.NOT_HERE,
    "missing": CancelStatus.NOT_HERE,
}


def kept_options(options: DispatchOptions) -> dict[str, Any]:
    """What a replay of the job must dispatch with again (the delay was for the first run)."""
    kept = {"webhook_url": options.webhook_url, "retry": options.retry, "after": options.after}
    return {key: value for key, value in kept.items() if value is not None}


class DramatiqEngine(Engine):
    name: ClassVar[EngineName] = "dramatiq"

    def __init__(self, store: JobStore, heartbeat_timeout: float) -> None:
        self.store = store
        self.heartbeat_timeout = heartbeat_timeout
        self._sweeper: DeadWorkerSweeper | None = None

    @property
    def _timeout_ms(self) -> int:
        return int(self.heartbeat_timeout * 1000)

    def ping(self) -> bool:
        with map_redis_errors():
            return bool(self.store.client.ping())

    def submit(self, job: Submission, *, seq: int = 0) -> Submitted:
        """Checks for live workers, dedupes the id and enqueues, in one Lua call. `seq`: the
        run number to start at (see `recover`)."""
        message = _message(job, seq)
        with map_redis_errors():
            reply = self.store.enqueue(
                job.job_id,
                job.name,
                job.queue,
                message.queue,
                message.redis_message_id,
                message.data,
                self._timeout_ms,
                kept_options(job.options),
                seq,
                job.options.priority,
                _park(job),
            )
        return self._submitted(reply)

    def submit_many(
        self, jobs: Iterable[Submission | NewJob]
    ) -> list[Submitted | EngineUnavailable]:
        """One Lua call per batch of jobs bound for the same Dramatiq queue (at most
        BATCH_JOBS jobs and about BATCH_BYTES of messages, so one call never blocks Redis for
        long). Each batch is sent, and the next made while Redis runs it, before its reply is
        read (`_BatchSender`), so the wait for Redis overlaps the encoding. Once a call fails,
        the jobs after it are not sent: each gets a non-ambiguous EngineUnavailable, the failed
        batch's jobs its error."""
        sender = _BatchSender(self)
        with sender:
            for item in _batches(jobs):
                if isinstance(item, _Prioritized):
                    sender.send_one(item)
                else:
                    sender.send(*item)
        return sender.results()

    def submit_batch(
        self, jobs: Iterable[Submission | NewJob]
    ) -> list[Submitted | EngineUnavailable]:
        """`submit_many` takes NewJobs as they are: their messages come from a template."""
        return self.submit_many(jobs)

    def _submitted(self, reply: Reply) -> Submitted:
        if reply.status == "enqueued":
            return _STARTED
        if reply.status == "no_workers":
            return _NO_WORKERS
        if reply.detail == self.name:
            return Submitted(SubmitStatus.DUPLICATE, owner=self.name)
        return Submitted(SubmitStatus.OWNED_ELSEWHERE, owner="temporal")

    def release(self, job_id: str, name: str, queue: str) -> Release:
        with map_redis_errors():
            reply = self.store.handoff(job_id, name, queue)
        if reply.status == "claimed":
            return Release(ReleaseStatus.RELEASED)
        return Release(ReleaseStatus.KEPT, reply.detail)

    def record(self, job_id: str) -> dict[str, str] | None:
        """The job's Redis record, if it is Dramatiq's."""
        with map_redis_errors():
            record = self.store.get(job_id)
        return record if record is not None and record.get("engine") == self.name else None

    def status(self, job_id: str) -> JobStatus | None:
        record = self.record(job_id)
        if record is None:
            return None
        state = JobState(record.get("state", JobState.QUEUED))
        result = json.loads(record["result"]) if record.get("result") else None
        progress = json.loads(record["progress"]) if record.get("progress") else None
        # Sealed in Redis with encryption on (jobyard.job_engine.crypto): read back as given.
        try:
            result, progress, error = (
                crypto.unseal(job_id, value)
                for value in (result, progress, record.get("error") or None)
            )
        except crypto.MissingEncryptionKeyError:
            if state in FINAL_STATES:  # a key removed since: the job log (rotated) answers
                return None
            raise
        run_at = int(record.get("run_at") or 0) / 1000  # set when rescheduled; past once it ran
        return JobStatus(
            job_id=job_id,
            engine=self.name,
            state=state,
            attempts=int(record.get("attempts", 0)),
            name=record.get("name"),
            result=result if state == JobState.SUCCEEDED else None,
            error=error,
            progress=progress,
            run_at=run_at if run_at > time.time() and state in _WAITING else None,
            display_state=record.get("hold_state") or None,
            waiting_reason=record.get("hold_reason") or None,
        )

    def cancel(self, job_id: str) -> Cancellation:
        record = self.record(job_id)
        if record is None:
            return Cancellation(CancelStatus.NOT_HERE)
        with map_redis_errors():
            reply = self.store.cancel(job_id, record["queue"])
        return Cancellation(_CANCEL[reply.status], reply.detail)

    def replay(self, job_id: str, payload: Any = None) -> Replay:
        """Keeps the finished steps: the replayed run skips them."""
        record = self.record(job_id)
        if record is None:
            return Replay(ReplayStatus.NOT_HERE)
        name, queue, state = record["name"], record["queue"], record.get("state")
        if record.get("payload"):
            payload = crypto.unseal(job_id, json.loads(record["payload"]))
        if payload is None:  # cancelled while queued: only the job log has the payload
            status = ReplayStatus.ACTIVE if state not in _REPLAYABLE else ReplayStatus.NEEDS_PAYLOAD
            return Replay(status, state, name, queue)
        next_seq = int(record.get("seq", 0)) + 1
        kept = json.loads(record["options"]) if record.get("options") else {}
        message = encode_job_message(
            name, queue, job_id, payload, seq=next_seq,
            webhook_url=kept.get("webhook_url"), retry=kept.get("retry"), after=kept.get("after"),
        )  # fmt: skip
        with map_redis_errors():
            reply = self.store.replay(
                job_id, queue, next_seq, message.redis_message_id, message.data
            )
        if reply.status == "ok":
            return Replay(ReplayStatus.REPLAYED, state, name, queue, payload)
        if reply.status in ("temporal", "missing"):
            return Replay(ReplayStatus.NOT_HERE)
        return Replay(ReplayStatus.ACTIVE, reply.detail or reply.status, name, queue)

    def steps(self, job_id: str) -> dict[str, Any]:
        record = self.record(job_id)
        if record is None:
            return {}
        with map_redis_errors():
            steps = self.store.steps(job_id)
        try:
            return {step: crypto.unseal(job_id, value) for step, value in steps.items()}
        except crypto.MissingEncryptionKeyError:
            if record.get("state") in FINAL_STATES:  # a key removed since: shown as none
                return {}
            raise

    def queue_depths(self) -> list[QueueDepth]:
        depths = []
        with map_redis_errors():
            for queue in queue_names():
                counts = self.store.queue_counts(queue)
                live = self.store.live_workers(queue, self._timeout_ms)
                depths.append(
                    QueueDepth(
                        queue,
                        counts.waiting,
                        counts.in_flight,
                        counts.delayed,
                        live,
                        counts.held,
                    )
                )
        return depths

    def workers(self) -> list[WorkerInfo]:
        found: dict[str, WorkerInfo] = {}
        with map_redis_errors():
            since = self.store.now() - self.heartbeat_timeout
            for queue in queue_names():
                for worker_id, seen in self.store.heartbeats_since(queue, since):
                    known = found.get(worker_id)
                    queues = [*(known.queues if known else []), queue]
                    last = max(seen, known.last_seen if known else 0)
                    found[worker_id] = WorkerInfo(worker_id, queues, last)
        return sorted(found.values(), key=lambda w: w.worker_id)

    def heartbeat_expiries(self, lookback: float = 0.0) -> list[float]:
        """Seconds until each queue with live workers has none left (its youngest heartbeat
        expires), and until each live Dramatiq broker's own heartbeat expires (then the messages
        it holds can be swept back to their queues). With `lookback`, also those that expired
        in the last `lookback` seconds (negative)."""
        with map_redis_errors():
            now = self.store.now()
            since = now - self.heartbeat_timeout - lookback
            beats = [self.store.heartbeats_since(queue, since) for queue in queue_names()]
            brokers = self.store.broker_heartbeats_since(since)
        queues = [max(s for _, s in b) for b in beats if b]
        return [seen + self.heartbeat_timeout - now for seen in [*queues, *brokers]]

    def job_log_backlog(self) -> int:
        with map_redis_errors():
            return self.store.job_log_backlog()

    def collect_orphans(self, fallback_reason: str) -> list[Orphan]:
        """Returns messages held by dead workers to their queues, then moves never-started
        jobs of queues with no live worker to the handoff list (one Lua call per queue) and
        lists everything on it: jobs to start elsewhere, then drop with `orphan_moved`."""
        with map_redis_errors():
            if self._sweeper is None:
                # Imported here: jobyard.queue.broker brings the whole worker side (Dramatiq's
                # broker, the job runner, the job log's ORM); only the rescue sweeps.
                from jobyard.queue.broker import DeadWorkerSweeper

                self._sweeper = DeadWorkerSweeper(self.store.client)
            self._sweeper.sweep(queue_names())
            for queue in queue_names():
                moved = self.store.rescue(queue, self._timeout_ms)
                if moved:
                    log.warning("queue %s has no live worker: %d job(s) moved", queue, moved)
            waiting = self.store.handoffs()
            orphans = []
            for data in waiting:
                job = _submission(data, fallback_reason)
                steps = self.store.steps(job.job_id)
                if steps:
                    job = dataclasses.replace(job, recorded_steps=steps)
                orphans.append(Orphan(data, job))
        return orphans

    def missing(self, job_ids: list[str]) -> list[str]:
        with map_redis_errors():
            return self.store.missing(job_ids)

    def restore_steps(self, job_id: str, steps: dict[str, str]) -> None:
        """Puts back step results (JSON text) of a job Redis lost, before `recover` enqueues it
        again: its run then skips them."""
        with map_redis_errors():
            self.store.restore_steps(job_id, steps)

    def recover(self, job: Submission) -> Submitted:
        """Enqueues again a job Redis lost (restarted empty). A fresh run number makes any copy
        of its old messages a worker still holds in memory stale, so only this one runs."""
        return self.submit(job, seq=secrets.randbelow(2**31) + 2**31)

    def wake_parked(self, queue: str, job_ids: list[str]) -> int:
        """Parked jobs a flow-control slot came back for enter their queue now."""
        with map_redis_errors():
            return self.store.wake(queue, job_ids)

    def orphan_moved(self, orphan: Orphan) -> None:
        with map_redis_errors():
            self.store.handoff_done(orphan.message)


_REPLAYABLE = (JobState.FAILED, JobState.DEAD, JobState.CANCELLED)
_STARTED = Submitted(SubmitStatus.STARTED)  # results are frozen: one each serves every job
_NO_WORKERS = Submitted(SubmitStatus.NO_WORKERS, owner="temporal")


def _submission(data: bytes, fallback_reason: str) -> Submission:
    job = decode_job_message(data)
    delay = max(0.0, job.eta - time.time()) if job.eta else None
    options = DispatchOptions(
        delay=delay or None, webhook_url=job.webhook_url, retry=job.retry, after=job.after
    )
    return Submission(
        job.job_id, job.name, job.queue, job.payload, options, fallback_reason=fallback_reason,
        trace=job.trace,
    )  # fmt: skip


#: Largest batch of one `enqueue_many` call: jobs, and bytes of messages (a batch may pass the
#: byte budget by one message, at most JOBYARD_MAX_PAYLOAD_BYTES and its envelope).
BATCH_JOBS = 500
BATCH_BYTES = 1 << 20


#: Bytes of a new job's message beyond its payload (ids, names, options), for the byte budget.
NEW_JOB_ENVELOPE = 250


class Batch:
    """One `enqueue_many` call's jobs, as the call takes them: each job's key, and its four
    arguments (name, message id, message, options JSON) in one flat list; `indices`: each job's
    place in the caller's list. New jobs' messages are made when the batch is sealed, a run of
    one job's at a time (one timestamp and one read of the random source for their ids)."""

    __slots__ = ("_new", "args", "indices", "job_keys", "size")

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.job_keys: list[str] = []
        self.args: list[Any] = []
        self.size = 0  # bytes of messages, about
        self._new: list[NewJob] = []  # added, messages not made yet

    def add(
        self, index: int, job_id: str, name: str, message_id: str, data: bytes, options: str
    ) -> None:
        self._make_new_messages()  # the jobs before it first: the batch keeps the callers' order
        self.indices.append(index)
        self.job_keys.append(keys.job(job_id))
        self.args += (name, message_id, data, options)
        self.size += len(data)

    def add_new(self, index: int, job: NewJob) -> None:
        self.indices.append(index)
        self._new.append(job)
        self.size += len(job.payload_json) + NEW_JOB_ENVELOPE

    def sealed(self) -> Batch:
        self._make_new_messages()
        return self

    def _make_new_messages(self) -> None:
        new, start = self._new, 0
        while start < len(new):
            name, queue = new[start].name, new[start].queue
            end = start + 1
            while end < len(new) and new[end].name == name:
                end += 1
            run = new[start:end]
            message_ids, messages = _template(name, queue).encode_many(
                [job.job_id for job in run], [job.payload_json for job in run]
            )
            self.job_keys += [keys.job(job.job_id) for job in run]
            for message_id, message in zip(message_ids, messages, strict=True):
                self.args += (name, message_id, message, "")
            start = end
        new.clear()


def _park(job: Submission) -> tuple[int, str, str] | None:
    """A job a flow-control limit holds at dispatch waits parked (see jobyard.lua)."""
    hold = job.hold
    if hold is None:
        return None
    until_ms = int((hold.until or 0) * 1000)
    return until_ms, hold.display_state, hold.waiting_reason


class _Prioritized(NamedTuple):
    """A job with a priority, or held by a flow-control limit, in `submit_many`: enqueued by
    itself (`enqueue` puts it in its band or parks it; `enqueue_many` takes neither, so that
    bulk jobs without them pay nothing)."""

    at: int  # its index in the caller's list
    job: Submission


def _batches(
    jobs: Iterable[Submission | NewJob],
) -> Iterator[tuple[str, str, Batch] | _Prioritized]:
    """(queue, Dramatiq queue, jobs) batches, each job's messages encoded, in the callers'
    order within each queue; a job with a priority on its own."""
    open_batches: dict[str, tuple[str, Batch]] = {}
    templated = NewJobMessages.usable()  # the same for every job of the call
    for index, job in enumerate(jobs):
        if job.priority if isinstance(job, NewJob) else (job.options.priority or job.hold):
            yield _Prioritized(index, as_submission(job))
            continue
        if templated and type(job) is NewJob:
            dramatiq_queue = job.queue
            opened = open_batches.get(dramatiq_queue)
            if opened is None:
                opened = open_batches[dramatiq_queue] = (job.queue, Batch())
            opened[1].add_new(index, job)
        else:
            submission = job if isinstance(job, Submission) else job.submission()
            message = _message(submission)
            kept = None if submission.options is NO_OPTIONS else kept_options(submission.options)
            dramatiq_queue = message.queue
            opened = open_batches.get(dramatiq_queue)
            if opened is None:
                opened = open_batches[dramatiq_queue] = (job.queue, Batch())
            opened[1].add(
                index, job.job_id, job.name, message.redis_message_id, message.data,
                json.dumps(kept) if kept else "",
            )  # fmt: skip
        queue, batch = opened
        if len(batch.indices) >= BATCH_JOBS or batch.size >= BATCH_BYTES:
            yield queue, dramatiq_queue, batch.sealed()
            del open_batches[dramatiq_queue]
    for dramatiq_queue, (queue, batch) in open_batches.items():
        yield queue, dramatiq_queue, batch.sealed()


_templates: dict[tuple[str, str], NewJobMessages] = {}


def _template(name: str, queue: str) -> NewJobMessages:
    template = _templates.get((name, queue))
    if template is None:
        template = _templates[name, queue] = NewJobMessages(name, queue)
    return template


def _message(job: Submission, seq: int = 0) -> EncodedMessage:
    """The job's first message: from its job's template when the dispatcher gave the payload's
    JSON text and the job has no options (most jobs), else built field by field."""
    options = job.options
    plain = options is NO_OPTIONS or options == NO_OPTIONS
    templated = plain and job.trace is None and NewJobMessages.usable()
    if job.payload_json is not None and seq == 0 and templated:
        message_id, data = _template(job.name, job.queue).encode(job.job_id, job.payload_json)
        return EncodedMessage(job.queue, message_id, data)
    return encode_job_message(
        job.name, job.queue, job.job_id, job.payload, seq=seq,
        delay_seconds=options.delay, webhook_url=options.webhook_url, retry=options.retry,
        after=options.after, trace=job.trace,
    )  # fmt: skip


class _BatchSender:
    """Sends `submit_many`'s batches on a BatchLine: each batch is sent, the next one is made
    while Redis runs it, then the first's reply is read and the next sent; one call is in
    flight at a time. Results are per index in the caller's list. Once a call fails, the
    batches after it are not sent (a non-ambiguous EngineUnavailable each)."""

    def __init__(self, engine: DramatiqEngine) -> None:
        self.engine = engine
        self._results: dict[int, Submitted | EngineUnavailable] = {}
        self._failed: EngineUnavailable | None = None
        self._line: BatchLine | None = None
        self._in_flight: Batch | None = None

    def __enter__(self) -> _BatchSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is None:
                self._finish()
        finally:
            if self._line is not None:
                self._line.close()

    def send(self, queue: str, dramatiq_queue: str, batch: Batch) -> None:
        self._finish()
        if self._failed is not None:
            skipped = EngineUnavailable(
                self.engine.name, f"not sent: an earlier batch failed ({self._failed})"
            )
            self._results.update(dict.fromkeys(batch.indices, skipped))
            return
        store = self.engine.store
        if self._line is None:
            self._line = store.batch_line()
        call = store.enqueue_batch_call(
            queue, dramatiq_queue, self.engine._timeout_ms, batch.job_keys, batch.args
        )
        try:
            with map_redis_errors():
                self._line.send(call)
        except EngineUnavailable as exc:
            self._fail(batch, exc)
            return
        self._in_flight = batch

    def _finish(self) -> None:
        """Reads the reply of the batch in flight, if any."""
        batch, self._in_flight = self._in_flight, None
        if batch is None or self._line is None:
            return
        try:
            with map_redis_errors():
                replies = self._line.read()
        except EngineUnavailable as exc:
            self._fail(batch, exc)
            return
        if replies is None:  # every job enqueued
            self._results.update(dict.fromkeys(batch.indices, _STARTED))
            return
        for index, reply in zip(batch.indices, replies, strict=True):
            self._results[index] = self.engine._submitted(reply)

    def send_one(self, item: _Prioritized) -> None:
        """A job of `_Prioritized`, by itself, once the batch in flight is read."""
        self._finish()
        if self._failed is not None:
            self._results[item.at] = EngineUnavailable(
                self.engine.name, f"not sent: an earlier batch failed ({self._failed})"
            )
            return
        try:
            self._results[item.at] = self.engine.submit(item.job)
        except EngineUnavailable as exc:
            self._failed = exc
            self._results[item.at] = exc

    def _fail(self, batch: Batch, exc: EngineUnavailable) -> None:
        self._failed = exc
        self._results.update(dict.fromkeys(batch.indices, exc))

    def results(self) -> list[Submitted | EngineUnavailable]:
        # Every job read is in a batch, and every batch sent or skipped: each has a result.
        return [self._results[index] for index in range(len(self._results))]

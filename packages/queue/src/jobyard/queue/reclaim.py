"""Messages of a dead worker process: taken back, marked as suspects, and run alone.

A process that dies (a step calling `os._exit`, a segfault, the OOM killer) leaves the messages
it held in its Dramatiq ack set: the ones it was running, one of which may have killed it, and
the ones it had fetched for later. Dramatiq puts them back on the queue once the process's
heartbeat is old, where a new process fetches them together again, runs them side by side, and
the one that kills its process kills the others with it, again and again; and since the run never
ends, its retry policy is never consulted.

jobyard takes them back itself (jobyard.lua `reclaim`): at once when the process's supervisor
sees it exit (jobyard.worker.supervisor, with its exit code or signal), or when a sweep finds its
heartbeat old (the whole host died). The jobs its record shows running there are *suspects*:
their messages are marked (`SUSPECT` in their options) and requeued; the ones only fetched go
back as they were. A worker runs a suspect alone in its process (jobyard.queue.worker.RunGate):
it waits for the process's other runs to end, and no other run starts until it ends. Its start
is recorded before its handler runs (`start` with the job's attempts), so a death during it is
the job's own: the next start of that message counts it as a failed attempt, and once the
attempts of its retry policy are used up the job is finished `dead` instead of run again
(`WorkerProcessDied`, saying how and on which host the process died).

A death while others ran beside it proves nothing against any one of them: each gets a run
alone before a death can count against it, so a job whose first death was shared runs at most
max(attempts, 2) times. A handler that kills its process before its first step (or a job
without steps, in its first second) shows nothing running in its record: its message becomes a
suspect when a second process dies holding it, and that first shared run is not counted.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from typing import Any

from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from jobyard.job_engine.errors import WORKER_PROCESS_DIED
from jobyard.job_engine.lifecycle import job_event
from jobyard.job_engine.states import JobState
from jobyard.queue import keys
from jobyard.queue.dramatiq_compat import dramatiq_maintenance
from jobyard.queue.messages import SEQ, WEBHOOK
from jobyard.queue.store import JobStore

log = logging.getLogger("jobyard.worker")

#: A message option: the message was taken back from a dead process; it runs alone.
SUSPECT = "jobyard_suspect"
#: The error class of a job finished dead because its process died in its last attempt.
#: How a broker found by its old heartbeat died (the reclaim prefixes "worker <worker id>").
STALE_HEARTBEAT = "stopped sending heartbeats (its exit status is not known)"


def is_suspect(options: dict[str, Any]) -> bool:
    return bool(options.get(SUSPECT))


def exit_description(host: str, pid: int, returncode: int) -> str:
    """How a worker process ended, as `subprocess` reports it (a negative code: a signal)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        how = f"was killed by signal {-returncode} ({name})"
    else:
        how = f"exited with exit code {returncode}"
    return f"worker process {pid} on host {host} {how}"


def died_error(attempts: int, died: str) -> str:
    return (
        f"{WORKER_PROCESS_DIED}: the job's process died during its last attempt "
        f"({attempts} used): {died or 'how is not known'}"
    )


def reclaim(
    store: JobStore,
    queue: str,
    *,
    dead_before_ms: int = 0,
    dead: Sequence[tuple[str, str]] = (),
) -> int:
    """Takes back what dead brokers held of `queue` (see `JobStore.reclaim`) and requeues the
    suspects marked, with any a reclaim interrupted earlier left on the list; a suspect whose
    run alone used its last attempt is finished dead here. Returns how many suspects were
    taken."""
    taken = store.reclaim(
        queue, dead_before_ms=dead_before_ms, stale_beat=STALE_HEARTBEAT, dead=dead
    )
    marked: list[tuple[str, bytes]] = []
    for message_id, data in store.suspects(queue):
        if data is None:
            marked.append((message_id, b""))  # removed meanwhile: only leaves the list
            continue
        raw = data.encode() if isinstance(data, str) else data
        try:
            message = Message.decode(raw)
        except Exception:  # not a message jobyard can read: requeued as it is
            log.exception("message %s of %s could not be marked as a suspect", message_id, queue)
            marked.append((message_id, raw))
            continue
        if _finished_exhausted(store, queue, message):
            marked.append((message_id, b""))  # dropped: its job is dead
            continue
        marked.append(
            (message_id, message.copy(options={**message.options, SUSPECT: True}).encode())
        )
    store.requeue_suspects(queue, marked)
    if taken:
        log.warning("%d job(s) of %s taken back from a dead worker process", taken, queue)
    return taken


def _finished_exhausted(store: JobStore, queue: str, message: Message[Any]) -> bool:
    """Finishes the job `dead` if its process died during a run alone (a suspect's) that used its
    last attempt, as the next start would find (jobyard.lua `start`); True if it is. Here rather
    than in a worker, which would first wait for a process to run the suspect alone."""
    job_id, payload = message.args[0], message.args[1]
    seq = int(message.options.get(SEQ, 0))
    record = store.get(job_id)
    if not record or record.get("lone") != str(seq) or record.get("state") != JobState.RUNNING:
        return False
    attempts, allowed = int(record.get("attempts", 0)), int(record.get("lone_attempts", 0))
    if not allowed or attempts < allowed:
        return False
    error = died_error(attempts, record.get("died", ""))
    owned = (
        store.finish(
            job_id,
            seq,
            JobState.DEAD,
            error=error,
            error_class=WORKER_PROCESS_DIED,
            payload=payload,
        )
        is not None
    )
    if owned:
        log.warning("job %s dead after %d attempt(s): %s", job_id, attempts, error)
        started_at = record.get("started_at")
        job_event(
            job_id, message.actor_name, JobState.DEAD, queue=queue, engine="dramatiq",
            attempts=attempts, started_at=int(started_at) / 1000 if started_at else None,
            webhook_url=message.options.get(WEBHOOK), logged=store.logs_changes,
            error=error, error_class=WORKER_PROCESS_DIED, payload=payload,
        )  # fmt: skip
    return owned


def sweep_dead_workers(store: JobStore, broker: RedisBroker, queue: str) -> None:
    """Messages held by brokers whose heartbeat expired go back to their queues, now (not by
    Dramatiq's chance maintenance); then Dramatiq's maintenance forgets those brokers."""
    now_ms = int(time.time() * 1000)
    reclaim(store, queue, dead_before_ms=now_ms - int(broker.heartbeat_timeout))
    for name in (queue, keys.delayed(queue)):
        dramatiq_maintenance(broker, name, now_ms)

"""Python face of jobyard.lua: job records, step results and worker liveness in Redis.

`JobStore` is one object with every command; its groups live apart, one module each:

- `script`: the script loaded and called (EVALSHA, NOSCRIPT), `Reply` and its decoding;
- `dispatch`: enqueue, one job or a batch (`BatchJob`, `BatchLine`), handoff, cancel, replay,
  rescue and the handoff list;
- `runs`: a job's run on a worker (`Delivery`, `StartResult`): start, steps, progress, finish,
  complete, reschedule;
- `liveness`: heartbeats, leases, Redis's clock, dead processes' messages taken back;
- `bands`: priorities' bands: a worker's fetch and requeue, a delayed message's hand-back;
- `reads`: records, steps, queue counts (`QueueCounts`) and the job log's outbox.
"""

from __future__ import annotations

from jobyard.queue.store.bands import BandCommands
from jobyard.queue.store.dispatch import BatchJob, BatchLine, DispatchCommands
from jobyard.queue.store.liveness import LivenessCommands
from jobyard.queue.store.reads import QueueCounts, Reads
from jobyard.queue.store.runs import NO_DELIVERY, Delivery, RunCommands, StartResult
from jobyard.queue.store.script import EnqueueCall, Reply, ScriptStore, _text

__all__ = [
    "NO_DELIVERY",
    "BatchJob",
    "BatchLine",
    "Delivery",
    "EnqueueCall",
    "JobStore",
    "QueueCounts",
    "Reply",
    "ScriptStore",
    "StartResult",
    "_text",
]


class JobStore(DispatchCommands, RunCommands, LivenessCommands, Reads, BandCommands):
    """Every jobyard.lua command, and the plain reads beside them (see the modules above)."""

"""The queue registry now lives in `jobyard.job_engine.queues` (engine-neutral: the Temporal
side reads it too). Re-exported here for code not yet switched to the new home."""

from jobyard.job_engine.queues import (
    DATA_SYNC,
    DEFAULT,
    SCHEDULED,
    QueueConfig,
    QueueError,
    UnknownQueueError,
    get_queue,
    parse_queue_list,
    queue,
    queue_names,
    retry_policy,
)

__all__ = [
    "DATA_SYNC",
    "DEFAULT",
    "SCHEDULED",
    "QueueConfig",
    "QueueError",
    "UnknownQueueError",
    "get_queue",
    "parse_queue_list",
    "queue",
    "queue_names",
    "retry_policy",
]

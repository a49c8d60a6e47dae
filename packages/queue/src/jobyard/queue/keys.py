"""Every Redis key jobyard uses, and the Dramatiq keys it touches, in one place.

jobyard:job:<job_id>       hash  the job record on the Dramatiq side (see jobyard.lua)
jobyard:steps:<job_id>     hash  step name -> JSON result of a finished step
jobyard:workers:<queue>    zset  worker id -> last heartbeat, ms on the Redis clock
jobyard:handoff            list  messages of jobs being moved to Temporal (their workers died)
jobyard:suspects:<queue>   list  ids of messages taken back from a dead process, to requeue marked
jobyard:joblog:events      stream  one entry per change a worker made to a job: the job log's outbox
jobyard:joblog:shipper     str   id of the shipper holding the lease to empty that outbox
jobyard:band:<queue>:<p>   list  ids of messages of priority p != 0 waiting on <queue> (data in
                                 dramatiq:<queue>.msgs); priority 0 waits on dramatiq:<queue>
jobyard:bands:<queue>      zset  p -> -p for each band of <queue> that may hold messages
jobyard:priority:<queue>   channel  published on when a message of priority > 0 enters <queue>
jobyard:parked:<queue>     zset  ids of messages of <queue> waiting for a flow-control slot ->
                                 when they ask again (ms); fetch moves due ones to their list
dramatiq:<queue>           list  Dramatiq message ids waiting on <queue>
dramatiq:<queue>.msgs      hash  Dramatiq message id -> encoded message
dramatiq:<queue>.DQ[.msgs] the same for messages delayed on <queue>
dramatiq:__heartbeats__    zset  Dramatiq broker id -> last heartbeat (Dramatiq's own)
dramatiq:__acks__.<broker>.<queue>  set  messages a consumer holds, not yet acked
"""

from __future__ import annotations

PREFIX = "jobyard"
DRAMATIQ_NAMESPACE = "dramatiq"
DELAY_SUFFIX = ".DQ"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def steps(job_id: str) -> str:
    return f"{PREFIX}:steps:{job_id}"


def workers(queue: str) -> str:
    return f"{PREFIX}:workers:{queue}"


def dramatiq_queue(queue: str) -> str:
    return f"{DRAMATIQ_NAMESPACE}:{queue}"


def dramatiq_messages(queue: str) -> str:
    return f"{DRAMATIQ_NAMESPACE}:{queue}.msgs"


def delayed(queue: str) -> str:
    """The Dramatiq name of `queue`'s delay queue."""
    return f"{queue}{DELAY_SUFFIX}"


def dramatiq_heartbeats() -> str:
    return f"{DRAMATIQ_NAMESPACE}:__heartbeats__"


def dramatiq_acks(broker_id: str, queue: str) -> str:
    return f"{dramatiq_acks_prefix()}{broker_id}.{queue}"


def dramatiq_acks_prefix() -> str:
    return f"{DRAMATIQ_NAMESPACE}:__acks__."


def suspects(queue: str) -> str:
    return f"{PREFIX}:suspects:{queue}"


def job_prefix() -> str:
    return f"{PREFIX}:job:"


def steps_prefix() -> str:
    return f"{PREFIX}:steps:"


def dramatiq_messages_pattern() -> str:
    """A SCAN pattern for every queue's and delay queue's messages hash."""
    return f"{DRAMATIQ_NAMESPACE}:*.msgs"


def handoff() -> str:
    return f"{PREFIX}:handoff"


def lost_writes_before() -> str:
    """ms since the epoch: the server may lack writes made before then (a failover seen)."""
    return f"{PREFIX}:lost_writes_before"


def job_log_events() -> str:
    return f"{PREFIX}:joblog:events"


def job_log_shipper() -> str:
    return f"{PREFIX}:joblog:shipper"


def band_prefix(queue: str) -> str:
    """`band(queue, p)` without p: jobyard.lua appends the priority it reads from a job."""
    return f"{PREFIX}:band:{queue}:"


def band(queue: str, priority: int) -> str:
    return f"{band_prefix(queue)}{priority}"


def bands(queue: str) -> str:
    return f"{PREFIX}:bands:{queue}"


def priority_channel(queue: str) -> str:
    return f"{PREFIX}:priority:{queue}"


def parked(queue: str) -> str:
    return f"{PREFIX}:parked:{queue}"

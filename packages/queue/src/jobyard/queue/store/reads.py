"""JobStore's plain reads and writes (no script): job records and steps, queue counts, and the
job log's outbox."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

from jobyard.queue import keys
from jobyard.queue.store.script import ScriptStore, _text


@dataclass(frozen=True)
class QueueCounts:
    waiting: int  # on the queue, not fetched
    in_flight: int  # fetched by a worker, not acked
    delayed: int  # on the delay queue: retry backoffs, durable sleeps, dispatch delays
    held: int = 0  # parked by a flow-control limit (jobyard:parked:<queue>)


class Reads(ScriptStore):
    def get(self, job_id: str) -> dict[str, str] | None:
        raw = self.client.hgetall(keys.job(job_id))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}

    def steps(self, job_id: str) -> dict[str, Any]:
        raw = self.client.hgetall(keys.steps(job_id))
        return {_text(k): json.loads(v) for k, v in raw.items()}

    def restore_steps(self, job_id: str, steps: dict[str, str]) -> None:
        """Writes step results (JSON text) a Redis that restarted empty lost (see rescue)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(keys.steps(job_id), mapping=steps)  # type: ignore[arg-type]
        pipe.expire(keys.steps(job_id), self.retention)  # as the "step" command does
        pipe.execute()

    def missing(self, job_ids: list[str]) -> list[str]:
        """Those of `job_ids` that have no record in Redis."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(keys.job(job_id))
        return [job_id for job_id, found in zip(job_ids, pipe.execute(), strict=True) if not found]

    def queue_counts(self, queue: str) -> QueueCounts:
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(keys.dramatiq_queue(queue))
        pipe.hlen(keys.dramatiq_messages(queue))
        pipe.hlen(keys.dramatiq_messages(keys.delayed(queue)))
        pipe.zcard(keys.parked(queue))
        waiting, held, delayed, parked = pipe.execute()
        # A queue's msgs hash holds waiting, parked and fetched messages alike.
        return QueueCounts(waiting, max(0, held - waiting - parked), delayed, parked)

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

    def job_log_backlog(self) -> int:
        """How many job changes wait in the outbox for the job log's shipper."""
        return int(self.client.xlen(keys.job_log_events()))

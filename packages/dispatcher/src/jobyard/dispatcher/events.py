"""A job's live events, on either engine: `ajob_events(job_id)` and GET /jobs/{id}/events.

The source is the job log's `job_events` table (jobyard.job_engine.db.joblog): state changes and
progress reports numbered per job (seq 1, 2, ...) in one sequence whichever engine wrote them,
in the order they happened, the first always the job's dispatch ("queued") whichever process
reached the log first. So a job that starts on Dramatiq and moves to Temporal reads as one
story, and a reader that stopped at seq n resumes at n + 1 with nothing lost or repeated.
Readers poll that table (a primary-key range read), so following a job costs the engines and
the dispatch path nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from jobyard.job_engine import crypto
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import FINAL_JOB_STATES, JobEvent, JobLog

__all__ = ["JobEventRecord", "ajob_events", "job_events", "read_events", "stream_position"]

#: Seconds between two reads of a job's new events while following it.
POLL_SECONDS = 0.25
#: Events read per query.
PAGE = 500


@dataclass(frozen=True)
class JobEventRecord:
    """One event of a job: `kind` "state" (state, engine, attempts, run_at: when a sleeping,
    delayed, retrying or held job runs next; error for a failed or dead job; display_state and
    waiting_reason for a job a flow-control limit holds, or that waits for children, jobs or
    an event, as get_job shows them) or "progress"."""

    job_id: str
    seq: int
    kind: str
    at: datetime
    state: str | None = None
    engine: str | None = None
    attempts: int | None = None
    progress: Any = None
    run_at: datetime | None = None
    error: str | None = None
    display_state: str | None = None
    waiting_reason: str | None = None

    @property
    def final(self) -> bool:
        return self.kind == "state" and self.state in FINAL_JOB_STATES

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("at", "run_at"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        return {k: v for k, v in data.items() if v is not None}


def read_events(job_id: str, after: int = 0, limit: int = PAGE) -> list[JobEventRecord]:
    """The job's events with seq > `after`, oldest first."""
    query = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > after)
        .order_by(JobEvent.seq)
        .limit(limit)
    )
    with session_scope() as session:
        return [
            JobEventRecord(
                e.job_id,
                e.seq,
                e.kind,
                e.at,
                e.state,
                e.engine,
                e.attempts,
                crypto.unseal(e.job_id, e.progress),
                e.run_at,
                crypto.unseal(e.job_id, e.error),
                e.display_state,
                e.waiting_reason,
            )
            for e in session.scalars(query)
        ]


def stream_position(job_id: str) -> tuple[int, str] | None:
    """(seq of the job's latest event, its state) from the job log, or None if it is not there."""
    query = select(JobLog.events, JobLog.state).where(JobLog.job_id == job_id)
    with session_scope() as session:
        row = session.execute(query).first()
        return (int(row[0]), str(row[1])) if row is not None else None


def job_events(
    job_id: str, after: int = 0, *, poll: float = POLL_SECONDS, timeout: float | None = None
) -> Iterator[JobEventRecord]:
    """The blocking twin of `ajob_events`, for scripts and worker code."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for event in read_events(job_id, after):
            after = event.seq
            yield event
            if event.final:
                return
        if deadline is not None and time.monotonic() > deadline:
            return
        time.sleep(poll)


async def ajob_events(
    job_id: str, after: int = 0, *, poll: float = POLL_SECONDS, timeout: float | None = None
) -> AsyncGenerator[JobEventRecord, None]:
    """Follow a job: its events after seq `after` (0: from the start), as they are written,
    ending with its final state (or after `timeout` seconds without one).

        async for event in ajob_events(handle.job_id):
            print(event.seq, event.kind, event.state or event.progress)

    To resume after a disconnect, pass the last seq you saw as `after`."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        for event in await asyncio.to_thread(read_events, job_id, after):
            after = event.seq
            yield event
            if event.final:
                return
        if deadline is not None and loop.time() > deadline:
            return
        await asyncio.sleep(poll)

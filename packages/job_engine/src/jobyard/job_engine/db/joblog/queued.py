"""The batched "queued" of jobs one dispatch call started (`dispatch_many`): one buffer entry
per batch, and the insert of the rows and first events of its jobs new to the log in one
statement, with none of the general path's per-row work.
"""

from __future__ import annotations

import json
from operator import itemgetter
from typing import Any, NamedTuple

from pydantic_core import to_json
from sqlalchemy import Connection, text

from jobyard.job_engine.db.joblog.merge import QUEUED, utc
from jobyard.job_engine.db.joblog.sql import first_seen, insert_events
from jobyard.job_engine.states import JobState


class QueuedBatch(NamedTuple):
    """The "queued" of jobs one dispatch call started at once, with the same name, queue and
    engine, and no fallback reason or wake time: what `record(job_id, ts=ts, name=name,
    queue=queue, engine=engine, state="queued", payload=..., enqueued_at=ts)` records for each,
    in one buffer entry. The flush inserts the rows of those new to the log, with their first
    event, in one statement (`write_queued`); a job whose row exists already takes the general
    path, as the event `record` would have queued."""

    ts: float  # unix seconds: the jobs' enqueued_at and state_at, and their event's time
    name: str
    queue: str
    engine: str
    #: (job id, its payload's JSON text as dispatch encoded it: strict JSON, UTF-8). The ids are
    #: dispatch's (`JOB_ID_PATTERN`: no character JSON escapes), so they are written unescaped.
    jobs: list[tuple[str, bytes]]

    def events(self) -> list[tuple[float, str, dict[str, Any]]]:
        """The batch as the events `record` would have queued, one per job."""
        return [
            (self.ts, job_id, {
                "name": self.name, "queue": self.queue, "engine": self.engine,
                "state": QUEUED, "payload": json.loads(payload), "enqueued_at": self.ts,
            })
            for job_id, payload in self.jobs
        ]  # fmt: skip


#: PostgreSQL: the rows of batched jobs new to the log and their first event, in one statement;
#: returns the jobs it did not insert (their row exists: usually none). :rows is a JSON array
#: of [job id, batch number, payload], sorted by job id (the order every writer locks rows in);
#: :batches one of [name, queue, engine, time (ISO), time (unix s)].
#: Times as the general path writes them: rows' from ISO text, events' from unix seconds.
_INSERT_QUEUED_PG = text(
    "WITH source AS ("
    " SELECT r ->> 0 AS job_id, b ->> 0 AS name, b ->> 1 AS queue, b ->> 2 AS engine,"
    " CAST(b ->> 3 AS timestamptz) AS at, CAST(b ->> 4 AS float8) AS ts,"
    " NULLIF(r -> 2, 'null'::jsonb) AS payload, n"
    " FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS rs(r, n)"
    " JOIN jsonb_array_elements(CAST(:batches AS jsonb)) WITH ORDINALITY AS bs(b, m)"
    " ON bs.m = CAST(r ->> 1 AS int) + 1"
    "), inserted AS ("
    " INSERT INTO job_log (job_id, name, queue, engine, state, attempts, payload, enqueued_at,"
    " state_at, events)"
    f" SELECT job_id, name, queue, engine, '{JobState.QUEUED}', 0, payload, at, at, 1 FROM source"
    " ORDER BY n"
    " ON CONFLICT (job_id) DO NOTHING RETURNING job_id"
    "), numbered AS ("
    " INSERT INTO job_events (job_id, seq, at, kind, state, engine, attempts)"
    f" SELECT s.job_id, 1, to_timestamp(s.ts), 'state', '{JobState.QUEUED}', s.engine, 0"
    " FROM inserted i JOIN source s ON s.job_id = i.job_id"
    ") SELECT s.job_id FROM source s LEFT JOIN inserted i ON i.job_id = s.job_id"
    " WHERE i.job_id IS NULL"
)

#: SQLite: the rows of batched jobs new to the log (their events follow in a second statement);
#: the arguments as PostgreSQL's, times as the naive UTC text SQLite stores.
_INSERT_QUEUED_SQLITE = text(
    "INSERT INTO job_log (job_id, name, queue, engine, state, attempts, payload, enqueued_at,"
    " state_at, events)"
    f" SELECT r.value ->> 0, b.value ->> 0, b.value ->> 1, b.value ->> 2, '{JobState.QUEUED}', 0,"
    " NULLIF(r.value -> 2, 'null'), b.value ->> 3, b.value ->> 3, 1"
    " FROM json_each(:rows) AS r JOIN json_each(:batches) AS b ON b.key = r.value ->> 1"
    " WHERE true ORDER BY r.key"
    " ON CONFLICT (job_id) DO NOTHING RETURNING job_id"
)


def insert_queued(
    connection: Connection, batches: list[QueuedBatch]
) -> tuple[int, list[QueuedBatch]]:
    """Inserts the rows, and their "queued" events, of the batched jobs new to the log; returns
    how many, and the jobs left for the general path (a row exists, or a job appears twice)."""
    postgres = connection.dialect.name == "postgresql"
    described: list[str] = []
    jobs: list[tuple[str, int, bytes]] = []
    for number, batch in enumerate(batches):
        at = utc(batch.ts)
        when = at.isoformat() if postgres else first_seen({"enqueued_at": at}, True)
        # pydantic-core's encoder: json.dumps cost a web process's job-log thread 12 us a batch,
        # and a plain dispatch_job is a batch of one (routing.record_dispatch).
        described.append(to_json([batch.name, batch.queue, batch.engine, when, batch.ts]).decode())
        jobs += [(job_id, number, payload) for job_id, payload in batch.jobs]
    jobs.sort(key=itemgetter(0))  # one lock order for every writer (see upsert_in)
    once, twice = jobs, []
    if len({job[0] for job in jobs}) < len(jobs):  # a job batched twice (rare): its first stays
        once = [job for at, job in enumerate(jobs) if at == 0 or jobs[at - 1][0] != job[0]]
        twice = [job for at, job in enumerate(jobs) if at > 0 and jobs[at - 1][0] == job[0]]
    rows = [b'["%s",%d,%s]' % (job_id.encode(), n, payload) for job_id, n, payload in once]
    parameters = {
        "rows": (b"[" + b",".join(rows) + b"]").decode(),
        "batches": "[" + ",".join(described) + "]",
    }
    if postgres:
        not_inserted = {job_id for (job_id,) in connection.execute(_INSERT_QUEUED_PG, parameters)}
        left = [job for job in once if job[0] in not_inserted] + twice
        inserted_count = len(once) - len(not_inserted)
    else:
        inserted = {job_id for (job_id,) in connection.execute(_INSERT_QUEUED_SQLITE, parameters)}
        first = [
            {"job_id": job_id, "seq": 1, "at": batches[n].ts, "kind": "state",
             "state": QUEUED, "engine": batches[n].engine, "attempts": 0}
            for job_id, n, _ in once
            if job_id in inserted
        ]  # fmt: skip
        if first:
            insert_events(connection, first)
        left = [job for job in once if job[0] not in inserted] + twice
        inserted_count = len(inserted)
    leftover: dict[int, list[tuple[str, bytes]]] = {}
    for job_id, number, payload in left:
        leftover.setdefault(number, []).append((job_id, payload))
    return inserted_count, [batches[n]._replace(jobs=kept) for n, kept in leftover.items()]

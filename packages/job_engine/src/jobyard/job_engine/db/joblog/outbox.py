"""Changes from the Dramatiq outbox (what the `jobyard worker` supervisor's shipper reads from
Redis), written exactly once: a job's row keeps the id of the last outbox entry written
(`outbox_id`), checked in the same transaction. On PostgreSQL most endings go in one UPDATE
(`ship_endings`); the rest take the general path (`ship_changes`).
"""

from __future__ import annotations

import functools
from collections import Counter
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Float,
    Integer,
    Text,
    bindparam,
    cast,
    func,
    insert,
    literal,
    null,
    select,
    text,
    update,
)
from sqlalchemy import column as typed_column
from sqlalchemy.dialects.postgresql import JSONB

from jobyard.job_engine import env
from jobyard.job_engine.db import Base, jobstats
from jobyard.job_engine.db.joblog.merge import PARTS, merge, merge_rules, row_of, segments
from jobyard.job_engine.db.joblog.sql import json_text, lock, outbox_ids_sqlite
from jobyard.job_engine.db.joblog.stats import add_stats, ending_stat
from jobyard.job_engine.db.joblog.upsert import upsert_in
from jobyard.job_engine.db.models import FINAL_JOB_STATES, JobEvent, JobLog

#: A change from the Dramatiq outbox: (outbox id, unix seconds, job id, the fields it set).
OutboxEvent = tuple[int, float, str, dict[str, Any]]


def ship_changes(connection: Connection, events: list[OutboxEvent]) -> int:
    """`ship`'s general path, in its transaction: the jobs' rows are locked, the events a batch
    wrote before (at or below the job's `outbox_id`: the shipper died before trimming them)
    are skipped, the rest are merged per round (`merge_rounds`) and upserted, and each job's
    `outbox_id` moves to its last event. Returns how many were new."""
    ids = sorted({job_id for _, _, job_id, _ in events})
    locked = lock(connection, ids) if connection.dialect.name == "postgresql" else None
    if locked is not None:
        written = {job_id: old["outbox_id"] for job_id, old in locked.items()}
    else:
        written = outbox_ids_sqlite(connection, ids)
    fresh_of: dict[str, list[OutboxEvent]] = {}
    for event in events:
        if event[0] > (written.get(event[2]) or 0):
            fresh_of.setdefault(event[2], []).append(event)
    rows = [_shipped_row(job_events) for job_events in fresh_of.values()]
    if rows:
        upsert_in(connection, rows, locked)
    return sum(len(job_events) for job_events in fresh_of.values())


def endings(events: list[OutboxEvent]) -> list[OutboxEvent]:
    """The batch's jobs whose one change is a final state with no progress report or wake
    time, queued long enough before they ended that the dispatching process has written
    their row (two of its flush intervals): most jobs, shipped after they ended, for
    `ship_endings`. A job without a row costs that UPDATE for nothing (measured: 13 us more
    shipper CPU per job than the general path alone), so a job that ended sooner goes straight
    to the general path, as does a change with a field the UPDATE does not take."""
    changes_per_job = Counter(event[2] for event in events)
    row_written_after = 2 * env.get_float(env.JOB_LOG_INTERVAL)
    return [
        event
        for event in events
        if changes_per_job[event[2]] == 1
        and event[3].get("state") in FINAL_JOB_STATES
        and event[3].keys() <= ENDING_FIELDS.keys()
        and event[1] - (event[3].get("enqueued_at") or event[1]) > row_written_after
    ]


def ship_endings(connection: Connection, endings: list[OutboxEvent]) -> set[str]:
    """PostgreSQL: the endings of jobs whose row holds an unfinished state, older than the
    ending, at least one event (its dispatch) and no later outbox entry, in one statement
    (the general path locks the rows first, then upserts them): the row merged as
    `merge_rules` merges it, the one state event `changes_of` would make, numbered after the
    row's last, and then the job_stats increment.
    Returns the jobs written; the rest take the general path (no row yet, a replayed batch,
    a row already final or newer)."""
    if not endings:
        return set()
    # One lock order (upsert_in's); times stay unix seconds (the database converts them).
    rows = {job_id: {"job_id": job_id, "outbox_id": entry, "state_at": at, **fields}
            for entry, at, job_id, fields in sorted(endings, key=itemgetter(2))}  # fmt: skip
    connection.execute(_BY_PRIMARY_KEY)
    rows_json = json_text(list(rows.values()))
    written = connection.execute(_endings_statement(), {"rows": rows_json}).all()
    increments = [
        ending_stat(rows[job_id], queue, started, enqueued)
        for job_id, queue, started, enqueued in written
    ]
    if increments:
        add_stats(connection, jobstats.combine(increments))
    return {job_id for job_id, *_ in written}


#: PostgreSQL: the endings UPDATE finds its rows by primary key, one probe per ending. The
#: planner, guessing 100 rows for a JSON recordset, may hash-join it with a scan of the whole
#: job_log instead (seen: 20,000 rows read for a batch of 1,000; a large log costs more each
#: batch). For this transaction only.
_BY_PRIMARY_KEY = text(
    "SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"
)

#: The columns the merge rules read that an ending never sets.
NOT_IN_ENDINGS = ("progress", "run_at", "fallback_reason", "events")

#: The fields of an ending (as the shipper's outbox events carry them) the endings statement
#: takes, with their types there; times are unix seconds.
ENDING_FIELDS = {
    "engine": Text, "state": Text, "name": Text, "queue": Text, "attempts": Integer,
    "enqueued_at": Float, "started_at": Float, "finished_at": Float, "duration_ms": BigInteger,
    "result": JSONB, "payload": JSONB, "error_message": Text, "error_class": Text,
    "error_traceback": Text,
}  # fmt: skip


@functools.cache
def _endings_statement() -> Any:
    """The endings UPDATE (`merge_rules`, on the conditions `ship_endings` states), the
    state event of each row it wrote, and what the job_stats increments need of the row."""
    table = Base.metadata.tables[JobLog.__tablename__]
    given = {"job_id": Text, "outbox_id": BigInteger, "state_at": Float, **ENDING_FIELDS}
    raw = (
        func.jsonb_to_recordset(cast(bindparam("rows"), JSONB))
        .table_valued(*[typed_column(name, kind) for name, kind in given.items()])
        .render_derived("raw", with_types=True)
    )
    seconds = ("state_at", "enqueued_at", "started_at", "finished_at")
    ending = select(
        raw.c.job_id, raw.c.outbox_id,
        *[func.to_timestamp(raw.c[name]).label(name) for name in seconds],
        *[raw.c[name] for name in ENDING_FIELDS if name not in seconds],
        *[cast(null(), table.c[name].type).label(name) for name in NOT_IN_ENDINGS],
    ).subquery("ending")  # fmt: skip
    merged = merge_rules(ending.c) | {"events": table.c.events + 1}
    written = (
        update(table)
        .values(merged)
        .where(
            table.c.job_id == ending.c.job_id,
            table.c.events > 0,  # a row without events takes the general path: its dispatch first
            table.c.state.not_in(FINAL_JOB_STATES),
            table.c.state_at.is_(None) | (ending.c.state_at >= table.c.state_at),
            table.c.outbox_id.is_(None) | (ending.c.outbox_id > table.c.outbox_id),
        )
        .returning(
            table.c.job_id,
            table.c.events,
            table.c.state_at,
            table.c.state,
            table.c.engine,
            table.c.attempts,
            ending.c.error_message,
            table.c.queue,
            # Unix seconds (float8) for the stats: a datetime a row would cost more to make.
            func.date_part("epoch", table.c.started_at).label("started"),
            func.date_part("epoch", table.c.enqueued_at).label("enqueued"),
        )
        .cte("written")
    )
    # The row was unfinished and older: its ending is its one state event (changes_of's
    # rules), with the merged row's engine and attempts.
    events = Base.metadata.tables[JobEvent.__tablename__]
    logged = (
        insert(events)
        .from_select(
            ["job_id", "seq", "at", "kind", "state", "engine", "attempts", "error"],
            select(
                written.c.job_id,
                written.c.events,
                written.c.state_at,
                literal("state"),
                written.c.state,
                written.c.engine,
                written.c.attempts,
                written.c.error_message,
            ),
        )
        .cte("logged")
    )
    return select(written.c.job_id, written.c.queue, written.c.started, written.c.enqueued).add_cte(
        logged
    )


def _shipped_row(job_events: list[OutboxEvent]) -> dict[str, Any]:
    """One job's row from its new outbox events: its final state, and its parts (for the
    events, see upsert.py) when it changed more than once."""
    if len(job_events) == 1:  # the usual batch: a job's one change since the last
        outbox_id, ts, job_id, fields = job_events[0]
        row = row_of(ts, job_id, fields)
    else:
        (parts,) = segments([(ts, j, fields) for _, ts, j, fields in job_events]).values()
        # One row per job, its final state; its parts, for the events (see upsert.py).
        row = merge([event for part in parts for event in part])[0]
        if len(parts) > 1:
            row[PARTS] = [merge(part)[0] for part in parts]
        outbox_id = max(event[0] for event in job_events)
    row["outbox_id"] = outbox_id
    return row

"""The job log's general path: a batch's rows (one per job, merged) are locked, numbered and
upserted, with their events and the job_stats of the jobs they end, in the caller's
transaction. The row lock orders the writers: whichever process writes, on whichever engine, a
job's events form one gap-free sequence.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from jobyard.job_engine.db import jobstats
from jobyard.job_engine.db.joblog.merge import PARTS, applied, changes_of, dispatch_event, stored
from jobyard.job_engine.db.joblog.sql import (
    insert_events,
    insert_new,
    lock,
    lock_rows,
    upsert_statement,
)
from jobyard.job_engine.db.joblog.stats import add_stats, finish_stat
from jobyard.job_engine.db.models import FINAL_JOB_STATES
from jobyard.job_engine.states import JobState

Pair = tuple[dict[str, Any], dict[str, Any]]  # (a row as given, the row as stored)


def upsert_in(
    connection: Connection, rows: list[dict[str, Any]], locked: dict[str, Any] | None = None
) -> None:
    """`locked`: PostgreSQL: `lock`'s answer for these rows' jobs, if the caller has it."""
    rows = sorted(rows, key=lambda row: str(row["job_id"]))  # one lock order for every writer
    pairs: list[Pair] = [(row, stored(row)) for row in rows]
    events: list[dict[str, Any]] = []
    finished: list[dict[str, Any]] = []
    if connection.dialect.name == "postgresql":
        before = locked if locked is not None else lock(connection, [r["job_id"] for r, _ in pairs])
        # Jobs new to the log are inserted whole (no update to merge into); one that another
        # writer inserted meanwhile is locked and merged as the others.
        fresh = [pair for pair in pairs if pair[0]["job_id"] not in before]
        if fresh:
            fresh_events: list[dict[str, Any]] = []
            fresh_finished: list[dict[str, Any]] = []
            _number(fresh, {}, fresh_events, fresh_finished)
            inserted = insert_new(connection, [kept for _, kept in fresh])
            events += [e for e in fresh_events if e["job_id"] in inserted]
            finished += [f for f in fresh_finished if f["job_id"] in inserted]
            raced = [row["job_id"] for row, _ in fresh if row["job_id"] not in inserted]
            if raced:
                before.update(lock(connection, raced))
        pairs = [pair for pair in pairs if pair[0]["job_id"] in before]
    else:
        before = lock_rows(connection, [kept for _, kept in pairs])
    _number(pairs, before, events, finished)
    if pairs:
        connection.execute(*upsert_statement(connection.dialect.name, [k for _, k in pairs]))
    if events:
        insert_events(connection, events)
    if finished:
        add_stats(connection, jobstats.combine([f["stat"] for f in finished]))


def _number(
    pairs: list[Pair],
    before: dict[str, Any],
    events: list[dict[str, Any]],
    finished: list[dict[str, Any]],
) -> None:
    """Appends each row's events, numbered after its job's last, and the job_stats increment
    of each job that reaches a final state; sets the stored rows' event counts. A job's first
    event is always its dispatch: a writer whose first change of a job new to the log is a
    later one writes the dispatch first (`dispatch_event`)."""
    for row, kept in pairs:
        old = before.get(row["job_id"])
        seq = old["events"] if old is not None else 0
        first = seq == 0
        parts = row.get(PARTS)
        for part in parts or (row,):
            for change in changes_of(part, old):
                if first and not (change["kind"] == "state" and change["state"] == JobState.QUEUED):
                    seq += 1
                    events.append({"job_id": row["job_id"], "seq": seq, **dispatch_event(part)})
                first = False
                seq += 1
                events.append({"job_id": row["job_id"], "seq": seq, **change})
                if change["kind"] == "state" and change["state"] in FINAL_JOB_STATES:
                    previous = old if old is not None and not old.get("new") else {}
                    if previous.get("state") not in FINAL_JOB_STATES:
                        stat = finish_stat(part, previous)
                        finished.append({"job_id": row["job_id"], "stat": stat})
            if parts:
                old = applied(part, old)
        kept["events"] = seq

"""The job log's merge rules: how events become a job's row and its numbered events.

A batch's events are merged per job (`merge`): sticky columns keep their first value, the rest
follow the newest event. Events from different processes can arrive out of order (a web
process flushes "queued" after the worker flushed "succeeded"), so a row's state only moves to
an event at least as new as the one it holds (`state_at`): `merge_rules` says so in SQL, for
the upsert and the shipper's endings, `applied` in Python, between the rounds of one write.
Several changes of one job in a batch are cut into parts (`segments`) written in rounds
(`merge_rounds`), so each state change and progress report becomes an event of its own
(`changes_of`), in order; a job's history starts with its dispatch (`dispatch_event`).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, func

from jobyard.job_engine.db import Base
from jobyard.job_engine.db.models import FINAL_JOB_STATES, JobLog
from jobyard.job_engine.states import JobState

#: A state as the rows and events hold it: a plain str, not a JobState member, which
#: pydantic-core writes into a flush's JSON at twice the cost (about 2 us more a row).
QUEUED = JobState.QUEUED.value

#: Columns an event may set whatever its age (first value wins).
STICKY = ("name", "queue", "payload", "enqueued_at", "started_at", "fallback_reason")

#: Columns that follow the event with the newest state.
LATEST = (
    "engine", "state", "result", "error_class", "error_message", "error_traceback",
    "finished_at", "duration_ms", "state_at",
)  # fmt: skip

#: Columns given in unix seconds to `record` (state_at: the event's time), stored as timestamps.
TIMESTAMPS = ("enqueued_at", "started_at", "finished_at", "state_at", "run_at")

#: Every column an upsert names; progress follows the newest report, attempts, events and
#: outbox_id only grow, run_at is the newest state's (None: not waiting on a timer).
COLUMNS = ("job_id", *STICKY, *LATEST, "progress", "attempts", "run_at", "events", "outbox_id")

#: A row's keys (not columns) a state change carries when the job waits held by a limit (or for
#: children, jobs or an event): why, as get_job shows it. Its state event keeps them.
HOLD = ("display_state", "waiting_reason")

#: A row's key (not a column) saying its state change is an event even if no rule below finds
#: it changed anything: a job's first look as it begins to wait for jobs or an event (the state
#: stays running; the looks after it add no event).
ANNOUNCED = "announced"

#: A row's key (not a column) saying its progress is a report, an event even if the value is
#: the one stored (the outbox's progress entries; a writer's rows may carry the current value).
REPORTED = "progress_reported"

#: A row's key (not a column): the rows it merges, in order, when each part's changes are
#: events of their own (`ship`: one upsert per job, however many changes it had in a batch).
PARTS = "parts"


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def merge(events: list[tuple[float, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per job: sticky columns keep their first value, the rest follow the newest event.
    Rows hold only the columns some event set (the rest stay NULL, i.e. unchanged), with times
    still in unix seconds."""
    rows: dict[str, dict[str, Any]] = {}
    for ts, job_id, fields in sorted(events, key=lambda e: e[0]):
        row = rows.get(job_id)
        if row is None:
            row = rows[job_id] = {"job_id": job_id}
        for key, value in fields.items():
            if value is None or (key in STICKY and key in row):
                continue
            row[key] = value
        if fields.get("state") is not None:
            row["state_at"] = ts
            # a state without a wake time is not waiting on a timer (any more)
            if fields.get("run_at") is None:
                row.pop("run_at", None)
            for key in (*HOLD, ANNOUNCED):  # a state that does not say why it waits is not
                if fields.get(key) is None:  # held (any more), nor announced
                    row.pop(key, None)
        if fields.get("progress") is not None:
            row["progress_at"] = ts  # not a column: the progress event's time
    return list(rows.values())


def row_of(ts: float, job_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    """`merge` of a job's only event."""
    row: dict[str, Any] = {"job_id": job_id}
    row.update((key, value) for key, value in fields.items() if value is not None)
    if fields.get("state") is not None:
        row["state_at"] = ts
    if fields.get("progress") is not None:
        row["progress_at"] = ts
    return row


def merge_rounds(events: list[tuple[float, str, dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Like `merge`, but each job's parts (`segments`) become rows of successive rounds: each
    round is upserted after the one before, so every state change and progress report a
    process recorded becomes an event of its own, in order."""
    if len({job_id for _, job_id, _ in events}) == len(events):
        # One event per job (a batch of dispatches): each is its own row, already in order.
        return [[row_of(*event) for event in events]]
    rounds: list[list[dict[str, Any]]] = []
    for parts in segments(events).values():
        for index, part in enumerate(parts):
            if index == len(rounds):
                rounds.append([])
            rounds[index].extend(merge(part))
    return rounds


def segments(
    events: list[tuple[float, str, dict[str, Any]]],
) -> dict[str, list[list[tuple[float, str, dict[str, Any]]]]]:
    """Each job's events in time order, cut into parts that hold at most one state and one
    progress value, a state never after a progress value but for a final one (a part's
    events come state first, but for a final state: see `changes_of`)."""
    parts_of: dict[str, list[list[tuple[float, str, dict[str, Any]]]]] = {}
    # Whether each job's current (last) part has a state, and a progress value, so far.
    holds: dict[str, tuple[bool, bool]] = {}
    for event in sorted(events, key=lambda e: e[0]):
        _, job_id, fields = event
        parts = parts_of.setdefault(job_id, [[]])
        has_state, has_progress = holds.get(job_id, (False, False))
        state = fields.get("state")
        progress = fields.get("progress")
        if (
            (state is not None and has_state)
            or (progress is not None and has_progress)
            or (state is not None and state not in FINAL_JOB_STATES and has_progress)
        ):
            parts.append([])
            has_state = has_progress = False
        parts[-1].append(event)
        holds[job_id] = (has_state or state is not None, has_progress or progress is not None)
    return parts_of


def changes_of(row: dict[str, Any], old: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The events a row (times in unix seconds) adds to a job whose row was `old`: a state
    event when its state is newer and changes the state, engine, attempt or wake time; a
    progress event for a new progress value, or any value the row says was reported (REPORTED),
    before a final state, after any other."""
    known = old is not None and not old.get("new")
    previous: dict[str, Any] = old if known and old is not None else {}
    at = row.get("state_at")
    state = row.get("state")
    old_at = previous.get("state_at")
    newer = state is not None and (old_at is None or (at is not None and utc(at) >= old_at))
    state_event: dict[str, Any] | None = None
    if newer:
        engine = row.get("engine") or previous.get("engine")
        attempts = max(row.get("attempts") or 0, previous.get("attempts") or 0)
        run_at = utc(row["run_at"]) if row.get("run_at") else None
        if (
            state != previous.get("state")
            or engine != previous.get("engine")
            or attempts > (previous.get("attempts") or 0)
            or run_at != previous.get("run_at")
            or row.get(ANNOUNCED)
        ):
            state_event = {
                "at": at if at is not None else time.time(), "kind": "state", "state": state,
                "engine": engine, "attempts": attempts, "run_at": row.get("run_at"),
                "error": row.get("error_message") if state in FINAL_JOB_STATES else None,
                **{key: row.get(key) for key in HOLD},
            }  # fmt: skip
    progress = row.get("progress")
    progress_event: dict[str, Any] | None = None
    if progress is not None and (row.get(REPORTED) or progress != previous.get("progress")):
        reported_at = row.get("progress_at") or at
        progress_event = {
            "at": reported_at if reported_at is not None else time.time(), "kind": "progress",
            "engine": row.get("engine") or previous.get("engine"), "progress": progress,
        }  # fmt: skip
    if state_event is not None and state in FINAL_JOB_STATES:
        return [e for e in (progress_event, state_event) if e is not None]
    return [e for e in (state_event, progress_event) if e is not None]


def dispatch_event(row: dict[str, Any]) -> dict[str, Any]:
    """The "queued" a job's history starts with, written by the first writer of a job whose
    first change it has is a later one (a worker's "running", shipped before the web process
    flushed the dispatch): at the job's enqueue time as that writer knows it (a Dramatiq
    job's on Redis's clock, from the outbox; a Temporal job's workflow start), else at the
    change's own time. The dispatch's own record, when it comes, merges into the row and adds
    no event: an event once written never changes, so a reader following the job never sees
    a later event before the dispatch, nor an event it read change."""
    first_at = row.get("state_at") or row.get("progress_at") or time.time()
    enqueued = row.get("enqueued_at")
    at = min(enqueued, first_at) if enqueued is not None else first_at
    return {"at": at, "kind": "state", "state": QUEUED, "engine": row.get("engine"),
            "attempts": 0, "run_at": None, "error": None}  # fmt: skip


def applied(row: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """The judged columns of a job's row once `row` is merged into `old` (as `merge_rules`
    does), to judge the next part of the job's changes against."""
    known = dict(old) if old is not None and not old.get("new") else {}
    at = utc(row["state_at"]) if row.get("state_at") is not None else None
    old_at = known.get("state_at")
    if row.get("state") is not None and (old_at is None or (at is not None and at >= old_at)):
        known.update(state=row["state"], state_at=at, run_at=None)
        if row.get("run_at"):
            known["run_at"] = utc(row["run_at"])
        if row.get("engine") is not None:
            known["engine"] = row["engine"]
    if row.get("progress") is not None:
        known["progress"] = row["progress"]
    known["attempts"] = max(row.get("attempts") or 0, known.get("attempts") or 0)
    if known.get("queue") is None:
        known["queue"] = row.get("queue")
    if known.get("started_at") is None and row.get("started_at") is not None:
        known["started_at"] = utc(row["started_at"])
    enqueued = utc(row["enqueued_at"]) if row.get("enqueued_at") is not None else None
    if enqueued is not None and (
        known.get("enqueued_at") is None or enqueued < known["enqueued_at"]
    ):
        known["enqueued_at"] = enqueued
    return known


def stored(row: dict[str, Any]) -> dict[str, Any]:
    """A copy of `row` as the table takes it (a caller may retry with the original)."""
    stored = {"state": QUEUED, "name": "unknown", "attempts": 0, "events": 0, **row}
    stored.pop(PARTS, None)
    for column in TIMESTAMPS:
        if column in stored:
            stored[column] = utc(stored[column])
    return stored


def merge_rules(new: Any) -> dict[str, Any]:
    """How a row absorbs a newer (or older) event; see the module docstring."""
    old = Base.metadata.tables[JobLog.__tablename__].c
    newer = old.state_at.is_(None) | (new.state_at.is_not(None) & (new.state_at >= old.state_at))
    rules: dict[str, Any] = {c: func.coalesce(old[c], new[c]) for c in STICKY}
    # the earliest known: a stub row's first guess gives way to the dispatch's own time
    rules["enqueued_at"] = case(
        (new.enqueued_at.is_(None), old.enqueued_at),
        (old.enqueued_at.is_(None) | (new.enqueued_at < old.enqueued_at), new.enqueued_at),
        else_=old.enqueued_at,
    )
    rules |= {c: case((newer, func.coalesce(new[c], old[c])), else_=old[c]) for c in LATEST}
    rules["progress"] = func.coalesce(new.progress, old.progress)
    rules["attempts"] = case((new.attempts > old.attempts, new.attempts), else_=old.attempts)
    rules["events"] = case((new.events > old.events, new.events), else_=old.events)
    rules["outbox_id"] = case(
        (old.outbox_id.is_(None) | (new.outbox_id > old.outbox_id), new.outbox_id),
        else_=old.outbox_id,
    )
    rules["run_at"] = case((newer, new.run_at), else_=old.run_at)
    # A replayed job starts over: the newer "queued" clears when it finished.
    replayed = newer & (new.state == JobState.QUEUED)
    rules["finished_at"] = case((replayed, None), else_=rules["finished_at"])
    return rules

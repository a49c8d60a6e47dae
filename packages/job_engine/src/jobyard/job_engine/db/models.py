"""jobyard's tables. The schema itself is created by the Alembic migrations in `migrations/`;
keep both in step (a test compares them)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    BindParameter,
    Boolean,
    CheckConstraint,
    Column,
    ColumnElement,
    Date,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from jobyard.job_engine.db import Base, JSONType, UTCDateTime, utcnow
from jobyard.job_engine.db.jobstats import RUN_COLUMNS, WAIT_COLUMNS
from jobyard.job_engine.states import JobState

# A BIGINT primary key that still auto-increments on SQLite (only INTEGER PRIMARY KEY does there).
BigId = BigInteger().with_variant(Integer(), "sqlite")

MESSAGE_ROLES = ("user", "assistant")
ENGINES = ("dramatiq", "temporal")
JOB_STATES = tuple(JobState)
FINAL_JOB_STATES = tuple(state for state in JobState if state.final)
REPORT_KINDS = ("daily", "weekly")
TICK_KINDS = ("tick", "trigger", "backfill")
# pending: claimed, to be dispatched by its owner (or by anyone once the lease ran out);
# buffered: waiting for the previous run to finish (overlap=buffer_one); skipped: overlap=skip.
TICK_STATES = ("pending", "buffered", "dispatched", "skipped", "failed")


#: The state index's condition (JobLog).
NOT_SUCCEEDED = text(f"state <> '{JobState.SUCCEEDED}'")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Token(Base):
    """An expiring credential (session, password reset, API token); `maintenance.token_cleanup`
    deletes the expired ones."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    token: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, index=True)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, server_default=func.now()
    )


class ConversationMessage(Base):
    """One message of an AI conversation. `job_id` is unique so a retried store is idempotent."""

    __tablename__ = "conversation_messages"
    __table_args__ = (CheckConstraint(_in("role", MESSAGE_ROLES), name="role"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    user_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, server_default=func.now()
    )


class JobLog(Base):
    """One row per job run: what ran where, how it ended and how long it took."""

    __tablename__ = "job_log"
    __table_args__ = (
        CheckConstraint(_in("engine", ENGINES), name="engine"),
        CheckConstraint(_in("state", JOB_STATES), name="state"),
        # The listing pages newest first by (enqueued_at, job_id), unfiltered or filtered by
        # state, name or queue: one index each answers a page without a sort (migration 0006).
        Index("ix_job_log_enqueued_at_job_id", "enqueued_at", "job_id"),
        # Succeeded jobs, most of the log, are left out: each index costs every job's ending
        # an entry (migration 0009). A query must name the state as a literal to use it.
        Index(
            "ix_job_log_state_enqueued_at",
            "state",
            "enqueued_at",
            "job_id",
            postgresql_where=NOT_SUCCEEDED,
            sqlite_where=NOT_SUCCEEDED,
        ),
        Index("ix_job_log_name_enqueued_at", "name", "enqueued_at", "job_id"),
        Index("ix_job_log_queue_enqueued_at", "queue", "enqueued_at", "job_id"),
        # The graphs read finished jobs in a time window: the columns they aggregate ride in
        # the index, so PostgreSQL answers from it alone.
        Index(
            "ix_job_log_finished_at",
            "finished_at",
            postgresql_include=["queue", "state", "duration_ms", "started_at", "enqueued_at"],
        ),
    )

    # Bytewise order on PostgreSQL, so the primary key answers id-prefix searches (LIKE 'abc%')
    # whatever the database's collation (migration 0009).
    job_id: Mapped[str] = mapped_column(
        String(255).with_variant(String(255, collation="C"), "postgresql"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    queue: Mapped[str | None] = mapped_column(String(128), nullable=True)
    engine: Mapped[str | None] = mapped_column(String(16), nullable=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default=JobState.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    payload: Mapped[Any | None] = mapped_column(JSONType, nullable=True)
    result: Mapped[Any | None] = mapped_column(JSONType, nullable=True)
    error_class: Mapped[str | None] = mapped_column(String(255), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    fallback_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[Any | None] = mapped_column(JSONType, nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    duration_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # When `state` was last set: events from several processes arrive out of order
    # (joblog/merge.py).
    state_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the job runs next: the wake time of a durable sleep, the next attempt of a retrying
    # job, the start of a delayed one (None when it is not waiting on a timer).
    run_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The seq of the job's latest row in job_events (0: none yet).
    events: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    # The last entry of the Dramatiq job log outbox written for this job (its Redis stream id as
    # ms * 1_000_000 + seq; None: none): a batch the shipper writes again after a crash adds no
    # event twice (jobyard/worker/shipper.py).
    outbox_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


def state_in(*states: str) -> ColumnElement[bool]:
    """job_log.state in `states`, written into the SQL as literals: the partial state index
    answers only a query whose states the planner sees (a bound parameter hides them once the
    driver prepares the statement, and the plan then reads the whole log)."""
    values: BindParameter[list[str]] = bindparam(
        "state", list(states), expanding=True, literal_execute=True, unique=True
    )
    return JobLog.__table__.c.state.in_(values)


class JobEvent(Base):
    """A job's state changes and progress reports, numbered per job (1, 2, ...) in the order
    they happened, whichever engine ran the job and whichever process wrote first (the first is
    always its dispatch, see joblog.dispatch_event): what GET /jobs/{id}/events and
    `ajob_events` stream. Written in the job log's batches (joblog.upsert), never per event."""

    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "state" | "progress"
    state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    engine: Mapped[str | None] = mapped_column(String(16), nullable=True)
    attempts: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress: Mapped[Any | None] = mapped_column(JSONType, nullable=True)
    run_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # A held or waiting job's state event: why it waits, as get_job shows it (migration 0014).
    display_state: Mapped[str | None] = mapped_column(String(64), nullable=True)
    waiting_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobStat(Base):
    """Finished jobs of one queue in one minute or hour (`span` seconds from `period_start`),
    with run-time and queue-wait histograms (bounds in jobstats.BOUNDS_MS): what the graphs
    read (see jobstats.py)."""

    __tablename__ = "job_stats"

    queue: Mapped[str] = mapped_column(String(128), primary_key=True)
    span: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    finished: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")


for _column in (*RUN_COLUMNS, *WAIT_COLUMNS):  # one count per histogram bucket
    Base.metadata.tables[JobStat.__tablename__].append_column(
        Column(_column, Integer, nullable=False, default=0, server_default="0")
    )


class JobReport(Base):
    """An aggregate of `job_log` over one day or ISO week; one row per (kind, period_start)."""

    __tablename__ = "job_reports"
    __table_args__ = (
        UniqueConstraint("kind", "period_start", name="uq_job_reports_kind_period_start"),
        CheckConstraint(_in("kind", REPORT_KINDS), name="kind"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    period_start: Mapped[date] = mapped_column(Date, nullable=False)
    period_end: Mapped[date] = mapped_column(Date, nullable=False)
    data: Mapped[Any] = mapped_column(JSONType, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, server_default=func.now()
    )


class ScheduleState(Base):
    """What every scheduler shares about one schedule: the cursor (every tick up to it has been
    claimed or skipped), pause, the last fire and its counters. Survives restarts."""

    __tablename__ = "schedule_state"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    cursor: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    paused: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default="false"
    )
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_tick_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_job_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    last_fired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    fired: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    skipped_overlap: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )
    skipped_catchup: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default="0"
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, server_default=func.now()
    )


class ScheduleTick(Base):
    """One claimed tick. The primary key is the tick's job id, derived from (schedule, tick
    time): inserting it is the claim, so however many schedulers race, one wins each tick."""

    __tablename__ = "schedule_ticks"
    __table_args__ = (
        CheckConstraint(_in("kind", TICK_KINDS), name="kind"),
        CheckConstraint(_in("state", TICK_STATES), name="state"),
        Index("ix_schedule_ticks_schedule_tick_at", "schedule", "tick_at"),
        Index("ix_schedule_ticks_state", "state"),
    )

    job_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    schedule: Mapped[str] = mapped_column(String(100), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    tick_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    engine: Mapped[str | None] = mapped_column(String(16), nullable=True)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


__all__ = [
    "ENGINES",
    "FINAL_JOB_STATES",
    "JOB_STATES",
    "MESSAGE_ROLES",
    "REPORT_KINDS",
    "TICK_KINDS",
    "TICK_STATES",
    "ConversationMessage",
    "JobEvent",
    "JobLog",
    "JobReport",
    "JobStat",
    "ScheduleState",
    "ScheduleTick",
    "Token",
]


class JobOwner(Base):
    """Which engine a caller-chosen job id belongs to, decided once for good: the registry both
    engines' dispatchers consult, so an id never runs on two engines, whatever fails between
    two dispatches of it (jobyard/dispatcher/owners.py)."""

    __tablename__ = "job_owners"
    __table_args__ = (CheckConstraint(_in("engine", ENGINES), name="engine"),)

    job_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    engine: Mapped[str] = mapped_column(String(16), nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    payload_digest: Mapped[str] = mapped_column(String(64), nullable=False)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class DispatchOutbox(Base):
    """Jobs dispatched inside the caller's transaction (`dispatch_job(..., connection=)`), not
    sent yet: the relay of every `jobyard worker` and `jobyard temporal-worker` sends each
    committed row to an engine and, in the same transaction, deletes it and writes the job's
    `job_log` row (jobyard/job_engine/db/dispatch_outbox.py). Not the job log's Dramatiq outbox
    (a Redis stream, `job_log.outbox_id`): this one is SQL, written by web processes."""

    __tablename__ = "dispatch_outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    queue: Mapped[str] = mapped_column(String(128), nullable=False)
    payload: Mapped[str] = mapped_column(Text, nullable=False)  # the strict JSON dispatch made
    options: Mapped[str | None] = mapped_column(Text, nullable=True)  # DispatchOptions as JSON
    # Unix seconds: when dispatch_job was called (the job's enqueued_at in the job log), and
    # when a relay may send it (later than that after a failed send: its backoff).
    enqueued_at: Mapped[float] = mapped_column(Float, nullable=False)
    available_at: Mapped[float] = mapped_column(Float, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobStep(Base):
    """A step's result, kept durably once its function returned, before the engine records it
    in Redis (jobyard/job_engine/db/steps.py): a Redis that comes back empty loses the job's
    record, and the job, dispatched again from the job log, must not run its finished steps
    again. Only jobs that use `ctx.run` or `ctx.sleep` write here."""

    __tablename__ = "job_steps"

    job_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    step: Mapped[str] = mapped_column(String(255), primary_key=True)
    result: Mapped[str] = mapped_column(Text, nullable=False)  # JSON text, as Redis holds it
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class SentEvent(Base):
    """An event from outside (`send_event`, `POST /events/{name}`: a payment confirmed, a human
    approving), for the jobs waiting in `ctx.wait_for_event` (jobyard/job_engine/events.py).
    Not the job log's `job_events` (a job's own state changes). A waiting job looks for rows of
    its name sent from JOBYARD_EVENT_LOOKBACK seconds before its wait began: the table, not a
    message to a waiting job, is the delivery, so an event sent before a wait, or while its job's
    worker is dead, is still found; the wait records the one it took."""

    __tablename__ = "sent_events"
    __table_args__ = (Index("ix_sent_events_name_sent_at", "name", "sent_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    data: Mapped[str] = mapped_column(Text, nullable=False)  # a JSON object's strict text
    sent_at: Mapped[float] = mapped_column(Float, nullable=False)  # unix s, the sender's clock

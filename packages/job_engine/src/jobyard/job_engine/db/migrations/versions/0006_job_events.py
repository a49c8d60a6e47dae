"""job_events (what GET /jobs/{id}/events streams), job_stats (the graphs' roll-ups per
minute and hour, filled from the existing log), job_log.run_at and .events, and the indexes the
dashboard's listing needs on a big job log.

Revision ID: 0006_job_events
Revises: 0005_job_owners
Create Date: 2026-11-26

job_events holds each job's state changes and progress reports numbered per job; job_log.events
is the latest number, so the writer that adds events locks one row, not a range. The single-
column state/name indexes become (column, enqueued_at, job_id): the listing's keyset order, so a
filtered page is read straight off an index. The finished_at index carries the columns the
graphs aggregate (PostgreSQL INCLUDE), so they are answered from the index alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# The histogram's shape is part of this revision's schema: a change of bounds needs a new one.
from jobyard.job_engine.db.jobstats import RUN_COLUMNS, SPANS, WAIT_COLUMNS, backfill_sql

revision = "0006_job_events"
down_revision = "0005_job_owners"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
GRAPH_COLUMNS = ["queue", "state", "duration_ms", "started_at", "enqueued_at"]


def upgrade() -> None:
    op.create_table(
        "job_events",
        sa.Column("job_id", sa.String(255), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=True),
        sa.Column("engine", sa.String(16), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=True),
        sa.Column("progress", JSONType, nullable=True),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_table(
        "job_stats",
        sa.Column("queue", sa.String(128), primary_key=True),
        sa.Column("span", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("period_start", sa.DateTime(timezone=True), primary_key=True),
        *[
            sa.Column(name, sa.Integer(), nullable=False, server_default="0")
            for name in ("finished", "failed", *RUN_COLUMNS, *WAIT_COLUMNS)
        ],
    )
    # the jobs that finished before this migration, so the graphs have their history
    for span in SPANS:
        op.execute(backfill_sql(op.get_bind().dialect.name, span))
    with op.batch_alter_table("job_log") as batch:
        batch.add_column(sa.Column("run_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("events", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_index("ix_job_log_state")
        batch.drop_index("ix_job_log_name")
        batch.drop_index("ix_job_log_enqueued_at")
        batch.drop_index("ix_job_log_finished_at")
        batch.create_index("ix_job_log_enqueued_at_job_id", ["enqueued_at", "job_id"])
        batch.create_index("ix_job_log_state_enqueued_at", ["state", "enqueued_at", "job_id"])
        batch.create_index("ix_job_log_name_enqueued_at", ["name", "enqueued_at", "job_id"])
        batch.create_index("ix_job_log_queue_enqueued_at", ["queue", "enqueued_at", "job_id"])
        batch.create_index(
            "ix_job_log_job_id_prefix", ["job_id"], postgresql_ops={"job_id": "varchar_pattern_ops"}
        )
        batch.create_index(
            "ix_job_log_finished_at", ["finished_at"], postgresql_include=GRAPH_COLUMNS
        )


def downgrade() -> None:
    with op.batch_alter_table("job_log") as batch:
        batch.drop_index("ix_job_log_finished_at")
        batch.drop_index("ix_job_log_job_id_prefix")
        batch.drop_index("ix_job_log_queue_enqueued_at")
        batch.drop_index("ix_job_log_name_enqueued_at")
        batch.drop_index("ix_job_log_state_enqueued_at")
        batch.drop_index("ix_job_log_enqueued_at_job_id")
        batch.create_index("ix_job_log_finished_at", ["finished_at"])
        batch.create_index("ix_job_log_enqueued_at", ["enqueued_at"])
        batch.create_index("ix_job_log_name", ["name"])
        batch.create_index("ix_job_log_state", ["state"])
        batch.drop_column("events")
        batch.drop_column("run_at")
    op.drop_table("job_events")
    op.drop_table("job_stats")

"""schedule_state and schedule_ticks: what every scheduler shares, so each tick fires once.

Revision ID: 0004_schedules
Revises: 0003_job_log_state_at
Create Date: 2026-11-26

The models are `ScheduleState` and `ScheduleTick` in `jobyard.job_engine.db.models`; the loop that
uses them is `jobyard.dispatcher.scheduler`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_schedules"
down_revision = "0003_job_log_state_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedule_state",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("cursor", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_tick_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_job_id", sa.String(255), nullable=True),
        sa.Column("last_fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fired", sa.Integer(), server_default="0", nullable=False),
        sa.Column("skipped_overlap", sa.Integer(), server_default="0", nullable=False),
        sa.Column("skipped_catchup", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("name", name="pk_schedule_state"),
    )
    op.create_table(
        "schedule_ticks",
        sa.Column("job_id", sa.String(255), nullable=False),
        sa.Column("schedule", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("tick_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("engine", sa.String(16), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "kind IN ('tick', 'trigger', 'backfill')", name="ck_schedule_ticks_kind"
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'buffered', 'dispatched', 'skipped', 'failed')",
            name="ck_schedule_ticks_state",
        ),
        sa.PrimaryKeyConstraint("job_id", name="pk_schedule_ticks"),
    )
    op.create_index("ix_schedule_ticks_schedule_tick_at", "schedule_ticks", ["schedule", "tick_at"])
    op.create_index("ix_schedule_ticks_state", "schedule_ticks", ["state"])


def downgrade() -> None:
    op.drop_table("schedule_ticks")
    op.drop_table("schedule_state")

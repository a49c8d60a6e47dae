"""sent_events: events sent from outside for jobs waiting in ctx.wait_for_event.

Revision ID: 0013_sent_events
Revises: 0012_dispatch_outbox
Create Date: 2026-12-07

`send_event(name, data)` (and `POST /events/{name}`) inserts a row; a job waiting for `name`
looks for rows sent since JOBYARD_EVENT_LOOKBACK seconds before its wait began
(jobyard/job_engine/events.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_sent_events"
down_revision = "0012_dispatch_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sent_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sent_events"),
    )
    op.create_index("ix_sent_events_name_sent_at", "sent_events", ["name", "sent_at"])


def downgrade() -> None:
    op.drop_index("ix_sent_events_name_sent_at", table_name="sent_events")
    op.drop_table("sent_events")

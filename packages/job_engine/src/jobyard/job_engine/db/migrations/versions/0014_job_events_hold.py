"""job_events: a held or waiting job's display_state and waiting_reason.

Revision ID: 0014_job_events_hold
Revises: 0013_sent_events
Create Date: 2026-12-07

A state event of a job a flow-control limit holds (or that waits for children, other jobs or
an event) says why, as get_job does: `display_state` (e.g. `waiting for slot`) and
`waiting_reason` (the limit and key). GET /jobs/{id}/events streams them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_job_events_hold"
down_revision = "0013_sent_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("display_state", sa.String(64), nullable=True))
        batch.add_column(sa.Column("waiting_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("waiting_reason")
        batch.drop_column("display_state")

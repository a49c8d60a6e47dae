"""job_steps: returned steps' results, durable before Redis records them.

Revision ID: 0007_job_steps
Revises: 0006_job_events
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_job_steps"
down_revision = "0006_job_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_steps",
        sa.Column("job_id", sa.String(255), nullable=False),
        sa.Column("step", sa.String(255), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "step", name="pk_job_steps"),
    )


def downgrade() -> None:
    op.drop_table("job_steps")

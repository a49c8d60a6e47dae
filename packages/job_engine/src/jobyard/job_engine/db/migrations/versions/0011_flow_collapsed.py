"""Debounced dispatches collapsed into another job's run (jobyard/job_engine/flow/store.py):
`get_job` of a collapsed dispatch follows `served_by` to the run that serves it.

Revision ID: 0011_flow_collapsed
Revises: 0010_flow_permits
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_flow_collapsed"
down_revision = "0010_flow_permits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "flow_collapsed",
        sa.Column("job_id", sa.String(255), nullable=False),
        sa.Column("served_by", sa.String(255), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_flow_collapsed"),
    )
    op.create_index("ix_flow_collapsed_expires_at", "flow_collapsed", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_flow_collapsed_expires_at", table_name="flow_collapsed")
    op.drop_table("flow_collapsed")

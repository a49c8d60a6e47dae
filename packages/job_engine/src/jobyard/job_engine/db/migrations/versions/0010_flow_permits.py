"""The flow-control permit store (jobyard/job_engine/flow/store.py): one row per bucket of a
rate limit, a concurrency limit or a debounce, shared by both engines.

Revision ID: 0010_flow_permits
Revises: 0009_job_log_lean_indexes
Create Date: 2026-12-07

`state` is the bucket's JSON (a rate limit's recent starts, a concurrency limit's leases and
waiters, a debounce's pending bursts); `expires_at` (epoch ms) is when it holds nothing any
more, for the purge. Only jobs that declare a limit touch it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_flow_permits"
down_revision = "0009_job_log_lean_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "flow_permits",
        sa.Column("scope", sa.String(160), nullable=False),
        sa.Column("bucket", sa.String(255), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "bucket", name="pk_flow_permits"),
    )
    op.create_index("ix_flow_permits_expires_at", "flow_permits", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_flow_permits_expires_at", table_name="flow_permits")
    op.drop_table("flow_permits")

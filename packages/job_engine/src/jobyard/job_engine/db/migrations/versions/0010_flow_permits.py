"""The flow-control permit store (jobyard/job_engine/flow/store.py): one row per bucket of a
rate limit, a concurrency limit or a debounce, shared by both engines.

Revision ID: 0010_flow_permits
Revises: 0009_job_log_lean_indexes
Create Date: 2026-12-07

`flow_permits.state` is the bucket's JSON (a rate limit's recent starts, a concurrency limit's
leases, a debounce's bursts); `expires_at` (epoch ms) is when it holds nothing any more, for the
purge. `flow_waiters` holds a concurrency bucket's waiting jobs, one row each (a key's queue can
be long), in arrival order (`since_ms`). Only jobs that declare a limit touch them.
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
    op.create_table(
        "flow_waiters",
        sa.Column("scope", sa.String(160), nullable=False),
        sa.Column("bucket", sa.String(255), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("since_ms", sa.BigInteger(), nullable=False),
        sa.Column("until_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "bucket", "holder", name="pk_flow_waiters"),
    )
    op.create_index(
        "ix_flow_waiters_order", "flow_waiters", ["scope", "bucket", "since_ms", "holder"]
    )
    op.create_index("ix_flow_waiters_until_ms", "flow_waiters", ["until_ms"])


def downgrade() -> None:
    op.drop_index("ix_flow_waiters_until_ms", table_name="flow_waiters")
    op.drop_index("ix_flow_waiters_order", table_name="flow_waiters")
    op.drop_table("flow_waiters")
    op.drop_index("ix_flow_permits_expires_at", table_name="flow_permits")
    op.drop_table("flow_permits")

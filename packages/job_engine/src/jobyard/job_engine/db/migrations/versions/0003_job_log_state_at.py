"""job_log.state_at: when the row's state was last set, so out-of-order events cannot regress it.

Revision ID: 0003_job_log_state_at
Revises: 0002_ai_usage
Create Date: 2026-11-23

Written by `jobyard.job_engine.db.joblog`, which batches events from many processes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_job_log_state_at"
down_revision = "0002_ai_usage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_log") as batch:
        batch.add_column(sa.Column("state_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_job_log_enqueued_at", ["enqueued_at"])


def downgrade() -> None:
    with op.batch_alter_table("job_log") as batch:
        batch.drop_index("ix_job_log_enqueued_at")
        batch.drop_column("state_at")

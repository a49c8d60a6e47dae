"""job_log.outbox_id: the last Dramatiq outbox entry written for each job.

Revision ID: 0008_job_log_outbox
Revises: 0007_job_steps
Create Date: 2026-11-27

The shipper writes the outbox's entries (one per state change or progress report) and then
trims them from Redis; if it dies between the commit and the trim, the next one reads them
again. Each job's row keeps the id of the last entry written, checked in the same transaction,
so those entries are skipped rather than added to job_events a second time.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_job_log_outbox"
down_revision = "0007_job_steps"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_log") as batch:
        batch.add_column(sa.Column("outbox_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_log") as batch:
        batch.drop_column("outbox_id")

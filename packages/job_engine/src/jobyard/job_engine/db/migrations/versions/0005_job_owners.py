"""job_owners: the engine each caller-chosen job id belongs to.

Revision ID: 0005_job_owners
Revises: 0004_schedules
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_job_owners"
down_revision = "0004_schedules"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_owners",
        sa.Column("job_id", sa.String(255), primary_key=True),
        sa.Column("engine", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("payload_digest", sa.String(64), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("engine IN ('dramatiq', 'temporal')", name="ck_job_owners_engine"),
    )


def downgrade() -> None:
    op.drop_table("job_owners")

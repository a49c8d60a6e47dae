"""ai_usage_windows: Gemini calls per window, for the engine-neutral rate limiter of ai.generate.

Revision ID: 0002_ai_usage
Revises: 0001_initial
Create Date: 2025-01-02

The model is `jobyard.job_engine.services.ai.models.AiUsageWindow`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_ai_usage"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ai_usage_windows",
        sa.Column("scope", sa.String(64), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("calls", sa.Integer(), server_default="0", nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("scope", "window_start", name="pk_ai_usage_windows"),
    )


def downgrade() -> None:
    op.drop_table("ai_usage_windows")

"""The `ai_usage_windows` table: Gemini calls counted per window, shared by every worker.

One row per (scope, window_start). `ai.generate` reserves a call by incrementing the row of the
current minute window and the row of the current UTC day in one transaction, each with
`INSERT ... ON CONFLICT DO UPDATE ... WHERE calls < limit RETURNING calls`; see `limiter.py`.
Created by the migration `0002_ai_usage`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from jobyard.job_engine.db import Base, UTCDateTime, utcnow


class AiUsageWindow(Base):
    """Calls (and tokens) spent in one window of one scope, e.g. ("gemini:day", 1735689600)."""

    __tablename__ = "ai_usage_windows"

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix seconds
    calls: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default="0"
    )
    output_tokens: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default="0"
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, server_default=func.now()
    )


__all__ = ["AiUsageWindow"]

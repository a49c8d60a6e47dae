"""Table `sent_events`: storing an event (send_event) and reading those a wait may take
(jobyard.job_engine.events has the rules)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from sqlalchemy import insert, select

from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import SentEvent as SentEventRow
from jobyard.job_engine.events import SentEvent


def store(name: str, data_json: str, sent_at: float) -> int:
    """The new event's id."""
    with session_scope() as session:
        inserted = session.execute(
            insert(SentEventRow)
            .values(name=name, data=data_json, sent_at=sent_at)
            .returning(SentEventRow.id)
        )
        event_id: int = inserted.scalar_one()
    return event_id


def sent_between(name: str, low: float, high: float) -> Iterator[SentEvent]:
    """The events of `name` sent between `low` and `high` (inclusive), in the order stored."""
    query = select(SentEventRow).where(SentEventRow.name == name, SentEventRow.sent_at >= low)
    if not math.isinf(high):
        query = query.where(SentEventRow.sent_at <= high)
    with session_scope() as session:
        rows: list[Any] = list(session.execute(query.order_by(SentEventRow.id)).scalars())
    for row in rows:
        yield SentEvent(row.id, row.name, json.loads(row.data), row.sent_at)

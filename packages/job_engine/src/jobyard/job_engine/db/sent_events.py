"""Table `sent_events`: storing an event (send_event) and reading those a wait may take
(jobyard.job_engine.events has the rules)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from sqlalchemy import insert, select

from jobyard.job_engine import crypto
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import SentEvent as SentEventRow
from jobyard.job_engine.events import SentEvent


def sealed_for(name: str) -> str:
    """What an event's body is sealed for with encryption on (jobyard.job_engine.crypto): its
    name, in place of a job id, so a sealed body cannot pass for another event's."""
    return f"event:{name}"


def store(name: str, data_json: str, sent_at: float) -> int:
    """The new event's id. Its body is sealed with encryption on; the name and time, which the
    waits look up by, stay readable."""
    data = crypto.seal_json(sealed_for(name), data_json)
    with session_scope() as session:
        inserted = session.execute(
            insert(SentEventRow)
            .values(name=name, data=data, sent_at=sent_at)
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
        data = json.loads(crypto.unseal_json(sealed_for(row.name), row.data))
        yield SentEvent(row.id, row.name, data, row.sent_at)

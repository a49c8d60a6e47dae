"""`jobyard keys rotate`: every sealed value the database keeps (the job log's rows and events,
returned steps, the dispatch outbox, sent events' bodies) encrypted again with the key ring's
primary key, so that an older key can leave JOBYARD_ENCRYPTION_KEYS. Values written before
encryption was on are sealed too.

In batches, one transaction each, in primary key order: stopped anywhere, it is run again (or
resumed after the last key it printed, `after=`), and a row already on the primary key is read
but not written. A row a worker changes meanwhile is safe: PostgreSQL locks the batch's rows
(FOR UPDATE); SQLite's writer lock makes a batch that read a row another writer then changed
fail, and it is tried again. Redis's side is jobyard.queue.rotation (the command runs it first)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, select, tuple_, update
from sqlalchemy.exc import OperationalError

from jobyard.job_engine import crypto, env
from jobyard.job_engine.db import get_engine
from jobyard.job_engine.db.joblog.sealed import SEALED_COLUMNS
from jobyard.job_engine.db.models import DispatchOutbox, JobEvent, JobLog, JobStep, SentEvent
from jobyard.job_engine.db.sent_events import sealed_for

#: Columns that hold JSON text (a sealed value's JSON), not a JSON value or plain text.
_JSON_TEXT = {("job_steps", "result"), ("dispatch_outbox", "payload"), ("sent_events", "data")}
#: What is rotated: table -> its sealed columns (the job log's from joblog/sealed.py).
ROTATED: dict[Table, tuple[str, ...]] = {
    JobLog.__table__: SEALED_COLUMNS["job_log"],  # type: ignore[dict-item]
    JobEvent.__table__: SEALED_COLUMNS["job_events"],  # type: ignore[dict-item]
    JobStep.__table__: ("result",),  # type: ignore[dict-item]
    DispatchOutbox.__table__: ("payload",),  # type: ignore[dict-item]
    SentEvent.__table__: ("data",),  # type: ignore[dict-item]
}
#: The column a table's values are sealed for (their associated data), and how; a job's own
#: values are sealed for its id.
_SEALED_FOR: dict[str, tuple[str, Callable[[str], str]]] = {
    "sent_events": ("name", sealed_for),  # an event's body, for its name
}
BUSY_RETRIES = 20


class NoEncryptionKeysError(RuntimeError):
    """Rotation needs the ring: JOBYARD_ENCRYPTION_KEYS is unset."""

    @staticmethod
    def message() -> str:
        return f"{env.ENCRYPTION_KEYS} is not set: there is no key to rotate to"


@dataclass
class BatchDone:
    table: str
    read: int  # rows read in this batch
    rewritten: int  # of them, rows written with the primary key
    last: tuple[Any, ...]  # the batch's last primary key: where a resumed run starts


def rotate(
    url: str | None = None,
    *,
    batch: int = 500,
    after: dict[str, tuple[Any, ...]] | None = None,
    on_batch: Callable[[BatchDone], None] | None = None,
) -> dict[str, int]:
    """Re-encrypts every table of ROTATED; returns rows rewritten per table. `after`: table ->
    the primary key to resume after."""
    ring = crypto.key_ring()
    if ring is None:
        raise NoEncryptionKeysError(NoEncryptionKeysError.message())
    engine = get_engine(url)
    totals: dict[str, int] = {}
    for table, columns in ROTATED.items():
        totals[table.name] = 0
        for done in _batches(engine, table, columns, batch, (after or {}).get(table.name)):
            totals[table.name] += done.rewritten
            if on_batch is not None:
                on_batch(done)
    return totals


def _batches(
    engine: Any, table: Table, columns: tuple[str, ...], size: int, after: tuple[Any, ...] | None
) -> Iterator[BatchDone]:
    keys = list(table.primary_key.columns)
    while True:
        for attempt in range(BUSY_RETRIES):
            try:
                done = _one_batch(engine, table, keys, columns, size, after)
                break
            except OperationalError as exc:  # SQLite: another writer came between
                if "locked" not in str(exc) and "busy" not in str(exc).lower():
                    raise
                if attempt == BUSY_RETRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        if done is None:
            return
        yield done
        after = done.last


def _one_batch(
    engine: Any,
    table: Table,
    keys: list[Any],
    columns: tuple[str, ...],
    size: int,
    after: tuple[Any, ...] | None,
) -> BatchDone | None:
    owner_column, sealed_for_owner = _SEALED_FOR.get(table.name, ("job_id", str))
    owner = table.c[owner_column]
    extra = [] if owner in keys else [owner]  # the outbox's key is its id, not its job's
    selected = [*keys, *extra, *(table.c[name] for name in columns)]
    query = select(*selected).order_by(*keys).limit(size)
    if after is not None:
        query = query.where(tuple_(*keys) > tuple_(*after))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            query = query.with_for_update()
        rows = connection.execute(query).all()
        if not rows:
            return None
        rewritten = 0
        for row in rows:
            changed = {}
            sealed_for_row = sealed_for_owner(getattr(row, owner_column))
            for name in columns:
                value = getattr(row, name)
                new = (
                    _reseal_json(sealed_for_row, value)
                    if (table.name, name) in _JSON_TEXT
                    else crypto.reseal(sealed_for_row, value)
                )
                if new is not value and new != value:
                    changed[name] = new
            if changed:
                where = [key == getattr(row, key.name) for key in keys]
                connection.execute(update(table).where(*where).values(**changed))
                rewritten += 1
        last = tuple(getattr(rows[-1], key.name) for key in keys)
        return BatchDone(table.name, len(rows), rewritten, last)


def _reseal_json(job_id: str, text: str | None) -> str | None:
    """`crypto.reseal` of a value kept as JSON text."""
    if text is None:
        return None
    ring = crypto.key_ring()
    assert ring is not None
    if text.startswith(f'"{crypto.MARKER}{ring.primary}$'):
        return text
    return crypto.seal_json(job_id, crypto.unseal_json(job_id, text))

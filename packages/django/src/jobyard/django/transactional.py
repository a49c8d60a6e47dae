"""`JobyardBackend` with `OPTIONS={"transactional": True}`: a task enqueued inside
`transaction.atomic()` is written into jobyard's dispatch outbox on Django's own database
connection, in that transaction, so it runs if and only if the block commits (a view that
raises after enqueueing leaves no task). Outside `atomic()` (autocommit) the row commits at once.

The connection must be to the database DATABASE_URL names, migrated with `jobyard db upgrade`
(`dispatch_outbox` is jobyard's table, not a Django model); the relays of `jobyard worker` and
`jobyard temporal-worker` send it (jobyard/dispatcher/relay.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import connections
from jobyard.dispatcher.models import JobHandle
from jobyard.dispatcher.transactional import dispatch_on

#: Checked identities, per Django connection alias and DB-API connection.
_checked: dict[tuple[str, int], dict[str, Any]] = {}


class DjangoTarget:
    """The dispatch outbox's `Target` on a Django database connection (its cursors take %s
    placeholders on every backend)."""

    placeholder = "%s"

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.connection = connections[alias]
        vendor = self.connection.vendor
        if vendor not in ("postgresql", "sqlite"):
            raise ValueError(
                f"jobyard's transactional enqueue needs PostgreSQL or SQLite; database {alias!r} "
                f"is {vendor}"
            )
        self.dialect = vendor

    def rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, list(params))
            return [tuple(row) for row in cursor.fetchall()]

    def execute_many(self, sql: str, params: list[tuple[Any, ...]]) -> None:
        with self.connection.cursor() as cursor:
            cursor.executemany(sql, params)

    def cache(self) -> dict[str, Any]:
        self.connection.ensure_connection()
        key = (self.alias, id(self.connection.connection))
        if key not in _checked and len(_checked) > 1000:  # reconnections: forget the old ones
            _checked.clear()
        return _checked.setdefault(key, {})


def enqueue(alias: str, name: str, payload: Any, options: dict[str, Any]) -> JobHandle:
    """The task's job into the outbox, in the current transaction of connection `alias`."""
    target = DjangoTarget(alias)
    connection = target.connection
    return dispatch_on(
        target, lambda: connection.in_atomic_block, name, payload, new_id=True, **options
    )

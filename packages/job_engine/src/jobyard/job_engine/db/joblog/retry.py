"""A job log transaction that PostgreSQL ended to break a deadlock is tried again at once.

The job log's writers (a web process's flush, the shipper, the Temporal worker's endings) lock
a batch's rows in job id order, but a row that another writer commits between a batch's locking
read and its insert of the jobs new to the log is met out of that order, so two batches can each
wait for the other (seen once in 35 s of 600 one-step jobs a second, bench/profile_one_step.py:
the shipper's locking read and a web process's insert). PostgreSQL aborts one of them after
`deadlock_timeout`; the other goes on. The aborted one wrote nothing, and trying it again
at once waits only for the survivor's commit. Before, it was logged as a failed flush and kept
for the next interval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

log = logging.getLogger("jobyard.joblog")

T = TypeVar("T")

#: SQLSTATEs of a transaction the database ended so that another could go on: deadlock_detected,
#: serialization_failure. Nothing of it was written.
RETRIED_SQLSTATES = frozenset({"40P01", "40001"})

#: Tries in all; a batch that deadlocks this often is left to its caller's own retry.
ATTEMPTS = 3


def deadlocked(exc: BaseException) -> bool:
    """Whether `exc` is a transaction the database aborted to break a deadlock."""
    orig = getattr(exc, "orig", None)
    return isinstance(exc, DBAPIError) and getattr(orig, "sqlstate", None) in RETRIED_SQLSTATES


def retrying_deadlocks(transaction: Callable[[], T]) -> T:
    """`transaction()` (one whole transaction), tried again while the database aborts it to
    break a deadlock, at most ATTEMPTS times in all."""
    for attempt in range(1, ATTEMPTS):
        try:
            return transaction()
        except DBAPIError as exc:
            if not deadlocked(exc):
                raise
            log.info("job log write chosen to break a deadlock; trying again (%d)", attempt)
    return transaction()  # the last try: whatever it raises is the caller's

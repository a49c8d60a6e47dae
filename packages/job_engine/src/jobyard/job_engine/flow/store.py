"""The permit store: every flow-control bucket's state in one row of `flow_permits`, in the
job log's database (PostgreSQL; SQLite on one host), shared by both engines.

Each operation is one short transaction on one bucket's row:

    INSERT INTO flow_permits ... ON CONFLICT (scope, bucket) DO UPDATE SET ... RETURNING
        state, <the database's clock>

locks the row (created if it is new) and returns its state and the database's time *after* the
lock was granted, so recorded times never go backwards and no host's clock matters. The limiter
rule (`flow.limiter`, pure and property-tested) then decides, and the new state is written
before the commit releases the lock. Buckets are independent rows: limits on different keys
never wait for each other. On SQLite the transaction is BEGIN IMMEDIATE (the database's one
writer lock): a deferred transaction whose snapshot went stale would fail with SQLITE_BUSY
instead of waiting.

A row whose state is empty is deleted; `purge` deletes the rows whose state has run out
(`expires_at`, ms): a tenant seen once leaves nothing behind for good.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import psycopg
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    String,
    Table,
    Text,
    create_engine,
)
from sqlalchemy import text as sql_text
from sqlalchemy.engine import make_url

from jobyard.job_engine.db import Base, database_url, get_engine, normalize_url
from jobyard.job_engine.flow.limiter import (
    RATE,
    DebounceClaim,
    DebounceState,
    DebounceTicket,
    LeaseState,
    Limit,
    admit,
    debounce_claim,
    debounce_dispatch,
    lease_release,
    lease_renew,
    lease_try_acquire,
    next_key,
    rate_expires_at,
    rate_try_start,
)

TABLE = "flow_permits"
#: Milliseconds a waiting debounce burst outlives its due time (a run that never claims it,
#: because its job was cancelled, leaves it for `purge`).
DEBOUNCE_GRACE_MS = 24 * 3600 * 1000
#: Milliseconds a started burst is kept, so that a rerun of its run (a retry, a claim whose
#: reply was lost) gets the same payload; by then the run has recorded it as a step.
DEBOUNCE_KEEP_STARTED_MS = 3600 * 1000

permits = Table(
    TABLE,
    Base.metadata,
    Column("scope", String(160), primary_key=True),
    Column("bucket", String(255), primary_key=True),
    Column("state", Text, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_flow_permits_expires_at", "expires_at"),
)

WAITERS = "flow_waiters"
#: A concurrency bucket's waiting jobs, one row each: a key's queue can be long (one tenant's
#: 10,000 jobs), so it is not kept in the bucket's JSON, which every operation rewrites. Every
#: change is made under the bucket's row lock in flow_permits. `since_ms` orders them (FIFO);
#: `until_ms` is when a waiter that stopped asking is forgotten.
waiters = Table(
    WAITERS,
    Base.metadata,
    Column("scope", String(160), primary_key=True),
    Column("bucket", String(255), primary_key=True),
    Column("holder", String(255), primary_key=True),
    Column("since_ms", BigInteger, nullable=False),
    Column("until_ms", BigInteger, nullable=False),
    Index("ix_flow_waiters_order", "scope", "bucket", "since_ms", "holder"),
    Index("ix_flow_waiters_until_ms", "until_ms"),
)

COLLAPSED = "flow_collapsed"
#: Debounced dispatches collapsed into another job's run: `get_job` of one follows `served_by`.
#: Kept until `expires_at` (ms; a finished job's record retention), then purged.
collapsed = Table(
    COLLAPSED,
    Base.metadata,
    Column("job_id", String(255), primary_key=True),
    Column("served_by", String(255), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_flow_collapsed_expires_at", "expires_at"),
)
_COLLAPSE = sql_text(
    f"INSERT INTO {COLLAPSED} (job_id, served_by, expires_at) VALUES (:job_id, :served_by, "
    ":expires_at) ON CONFLICT (job_id) DO NOTHING"
)
_SERVED_BY = sql_text(f"SELECT served_by FROM {COLLAPSED} WHERE job_id = :job_id")

_PG_NOW = "(extract(epoch from clock_timestamp()) * 1000)::bigint"
# julianday('now') holds whole milliseconds; rounding (not truncating) keeps the float product's
# error from reading a millisecond early, which a caller sleeping `retry_in` would meet as a refusal
_SQLITE_NOW = "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)"
_LOCK = (
    f"INSERT INTO {TABLE} (scope, bucket, state, expires_at) VALUES ({{p}}, {{p}}, '', 0) "
    f"ON CONFLICT (scope, bucket) DO UPDATE SET expires_at = {TABLE}.expires_at "
    "RETURNING state, {now}"
)
_WRITE = (
    f"UPDATE {TABLE} SET state = {{p}}, expires_at = {{p}} WHERE scope = {{p}} AND bucket = {{p}}"
)
_DELETE = f"DELETE FROM {TABLE} WHERE scope = {{p}} AND bucket = {{p}}"
_SCOPE_ROWS = f"SELECT bucket, state, {{now}} FROM {TABLE} WHERE scope = {{p}} AND state <> ''"
_ALL_ROWS = f"SELECT scope, bucket, state, {{now}} FROM {TABLE} WHERE state <> ''"
_PURGE = f"DELETE FROM {TABLE} WHERE expires_at < {{now}}"
_NOW = "SELECT {now}"
_W_BUCKET = "scope = {p} AND bucket = {p} AND until_ms > {p}"
#: The holder's place (None: not waiting) and the live waiters (up to a bound), in one trip.
_W_SINCE = (
    f"SELECT (SELECT since_ms FROM {WAITERS} WHERE holder = {{p}} AND " + _W_BUCKET + "), "
    f"(SELECT count(*) FROM (SELECT 1 FROM {WAITERS} WHERE " + _W_BUCKET + " LIMIT {p}) AS n)"
)
_W_AHEAD = (
    f"SELECT count(*) FROM (SELECT 1 FROM {WAITERS} WHERE " + _W_BUCKET
    + " AND (since_ms < {p} OR (since_ms = {p} AND holder < {p})) LIMIT {p}) AS ahead"
)  # fmt: skip
_W_COUNT = f"SELECT count(*) FROM (SELECT 1 FROM {WAITERS} WHERE " + _W_BUCKET + " LIMIT {p}) AS n"
_W_FIRST = (
    f"SELECT holder FROM {WAITERS} WHERE " + _W_BUCKET + " ORDER BY since_ms, holder LIMIT {p}"
)
_W_JOIN = (
    f"INSERT INTO {WAITERS} (scope, bucket, holder, since_ms, until_ms) "
    "VALUES ({p}, {p}, {p}, {p}, {p}) ON CONFLICT (scope, bucket, holder) DO UPDATE SET "
    f"since_ms = CASE WHEN {WAITERS}.until_ms <= excluded.since_ms THEN excluded.since_ms "
    f"ELSE {WAITERS}.since_ms END, until_ms = excluded.until_ms"
)
_W_REMOVE = f"DELETE FROM {WAITERS} WHERE scope = {{p}} AND bucket = {{p}} AND holder = {{p}}"
_W_HASTEN = (
    f"UPDATE {WAITERS} SET until_ms = {{p}} WHERE scope = {{p}} AND bucket = {{p}} "
    "AND holder = {p} AND until_ms > {p}"
)
_W_SCOPE = (
    f"SELECT bucket FROM {WAITERS} WHERE scope = {{p}} AND until_ms > {{now}} GROUP BY bucket"
)
_W_ALL = (
    f"SELECT scope, bucket, count(*) FROM {WAITERS} WHERE until_ms > {{now}} GROUP BY scope, bucket"
)
_W_PURGE = f"DELETE FROM {WAITERS} WHERE until_ms < {{now}}"
_C_PURGE = f"DELETE FROM {COLLAPSED} WHERE expires_at < {{now}}"
_NOT_DURABLE = "SET LOCAL synchronous_commit = off"


class _Dialect(NamedTuple):
    lock: str
    write: str
    delete: str
    scope_rows: str
    all_rows: str
    purge: str
    now: str
    w_since: str
    w_ahead: str
    w_count: str
    w_first: str
    w_join: str
    w_remove: str
    w_hasten: str
    w_scope: str
    w_all: str
    w_purge: str
    c_purge: str


def _dialect(placeholder: str, now: str) -> _Dialect:
    templates = (
        _LOCK, _WRITE, _DELETE, _SCOPE_ROWS, _ALL_ROWS, _PURGE, _NOW, _W_SINCE, _W_AHEAD,
        _W_COUNT, _W_FIRST, _W_JOIN, _W_REMOVE, _W_HASTEN, _W_SCOPE, _W_ALL, _W_PURGE, _C_PURGE,
    )  # fmt: skip
    return _Dialect(*(t.format(p=placeholder, now=now) for t in templates))


_POSTGRESQL = _dialect("%s", _PG_NOW)
_SQLITE = _dialect("?", _SQLITE_NOW)

_T = TypeVar("_T")
#: A rule applied under a bucket's lock: (state or None, db now ms) ->
#: (outcome, new state or None to delete the row, expires_at ms).
_Rule = Callable[[Any, int], tuple[_T, Any, int]]
#: A decision over several locked buckets: (their states, db now ms) -> (outcome, per bucket
#: KEEP or (new state or None to delete the row, expires_at ms)).
_Decide = Callable[[list[Any], int], tuple[_T, list[Any]]]
#: A bucket a decision leaves as it was.
KEEP = object()


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


@dataclass(frozen=True)
class RateGrant:
    granted: bool
    at: float  # the database's time of the decision, epoch seconds: a granted start's time
    retry_in: float  # refused: seconds until the window allows one more start


@dataclass(frozen=True)
class SlotGrant:
    granted: bool
    at: float
    position: int = 0  # refused: waiters of the bucket ahead of this one
    retry_in: float = 0.0  # refused: seconds until the job asks again unless woken first


@dataclass(frozen=True)
class PermitRequest:
    """One limit a run must pass, in `acquire_all`: kind RATE (`calls` per `period`),
    CONCURRENCY (`limit` leases of `ttl`, waiters park at most `park`) or DEBOUNCE (claim the
    burst the run serves)."""

    kind: str
    scope: str
    bucket: str
    calls: int = 0
    period: float = 0.0
    limit: int = 0
    ttl: float = 0.0
    park: float = 0.0


@dataclass(frozen=True)
class Admission:
    """`acquire_all`'s answer. Granted: every limit took the run (`debounce`: the claimed
    burst, its last payload and members; None when the run has no burst to claim any more,
    a rerun). Refused: nothing was taken; `refused` is the first limit that said no,
    `retry_in` the seconds until the run asks again (a release may wake it sooner)."""

    granted: bool
    at: float
    refused: PermitRequest | None = None
    retry_in: float = 0.0
    position: int = 0
    debounce: DebounceClaim | None = None


@dataclass(frozen=True)
class HeldSlot:
    scope: str
    bucket: str
    holder: str
    limit: int


@dataclass(frozen=True)
class BucketCounts:
    """What a bucket holds now (for Prometheus and the dashboard)."""

    scope: str
    bucket: str
    running: int  # live leases
    waiting: int  # waiters (concurrency) or waiting debounce bursts
    recent_starts: int  # rate: starts in the bucket's window


class TableWaiters:
    """A concurrency bucket's waiters in `flow_waiters`, read and written in the transaction
    that holds the bucket's row lock (limiter.Waiters). Reads go to the table at once; changes
    are kept until `flush`, so that a run refused by another of its limits can `discard` the
    ones that would have given it a slot (acquire_all is all or nothing)."""

    def __init__(self, store: PermitStore, scope: str, bucket: str) -> None:
        self.cursor, self.sql = store._tx.cursor, store.sql
        self.scope, self.bucket = scope, bucket
        self.now = 0
        self.ops: list[tuple[str, tuple[Any, ...]]] = []
        self.removed: set[str] = set()
        self.counted: tuple[int, int] | None = None
        store._tx.waiters.append(self)

    def _one(self, sql: str, *params: Any) -> Any:
        self.cursor.execute(sql, params)
        row = self.cursor.fetchone()
        return None if row is None else row[0]

    def prune(self, now: int) -> None:
        self.now = now  # expired rows are skipped by every read; `purge` deletes them

    def position(self, holder: str, bound: int) -> int | None:
        if holder in self.removed:
            return None
        key = (self.scope, self.bucket, self.now)
        self.cursor.execute(self.sql.w_since, (holder, *key, *key, bound))
        since, live = self.cursor.fetchone()
        if since is None:
            self.counted = (bound, int(live))  # the count the rule asks for next
            return None
        ahead = self._one(self.sql.w_ahead, self.scope, self.bucket, self.now, since, since,
                          holder, bound)  # fmt: skip
        return int(ahead)

    def count(self, bound: int) -> int:
        if self.counted is not None and self.counted[0] == bound and not self.ops:
            return self.counted[1]
        return int(self._one(self.sql.w_count, self.scope, self.bucket, self.now, bound))

    def join(self, holder: str, now: int, until: int) -> None:
        self.removed.discard(holder)
        self.ops.append((self.sql.w_join, (self.scope, self.bucket, holder, now, until)))

    def remove(self, holder: str) -> None:
        self.removed.add(holder)
        self.ops.append((self.sql.w_remove, (self.scope, self.bucket, holder)))

    def first(self, n: int) -> list[str]:
        if n <= 0:
            return []
        self.cursor.execute(
            self.sql.w_first, (self.scope, self.bucket, self.now, n + len(self.removed))
        )
        holders = [str(r[0]) for r in self.cursor.fetchall()]
        return [h for h in holders if h not in self.removed][:n]

    def hasten(self, holders: Sequence[str], until: int) -> None:
        for holder in holders:
            self.ops.append((self.sql.w_hasten, (until, self.scope, self.bucket, holder, until)))

    def discard(self) -> None:
        self.ops.clear()

    def flush(self) -> None:
        for sql, params in self.ops:
            self.cursor.execute(sql, params)
        self.ops.clear()


class _Transaction(threading.local):
    """The cursor of the transaction this thread is in, and the waiters it changed."""

    cursor: Any = None
    waiters: list[TableWaiters]


class PermitStore:
    """Acquire, renew and release permits in the database at `url` (default: DATABASE_URL)."""

    def __init__(self, url: str | None = None, *, durable: bool = True) -> None:
        """`durable=False` (PostgreSQL): permits commit without waiting for the WAL flush,
        several times cheaper; a crash of the database server (not of a client) may then
        forget the permits of its last few hundred milliseconds, letting that many starts
        through again."""
        self.engine = _engine(url)
        self.sqlite = self.engine.dialect.name == "sqlite"
        self.sql = _SQLITE if self.sqlite else _POSTGRESQL
        self.durable = durable
        self._tx = _Transaction()
        self._disconnects: tuple[type[BaseException], ...] = (
            (sqlite3.OperationalError,) if self.sqlite else (psycopg.OperationalError,)
        )

    # --- the one transaction shape ----------------------------------------------------------

    def _transaction(self, items: Sequence[tuple[str, str]], decide: _Decide[_T]) -> _T:
        """Lock every bucket's row (in (scope, bucket) order, so two callers never deadlock),
        let `decide(states, now)` see them all at once, write what it changed, commit. `now` is
        the database's clock once every lock is held.

        A connection found dropped (a database restart) while locking is replaced and the
        transaction run again: nothing of it can have been committed. Lost once the writes and
        the COMMIT were sent, it is not retried (the commit may have happened): the error goes
        to the caller, and every operation is safe to repeat (a rate start counted twice only
        delays the next; a held lease is renewed; a claimed burst is claimed again)."""
        for tries_left in (1, 0):
            connection = self.engine.raw_connection()
            writing = [False]
            try:
                if self.sqlite:
                    return self._sqlite_transaction(connection, items, decide, writing)
                return self._postgresql_transaction(connection, items, decide, writing)
            except self._disconnects as exc:
                if not tries_left or writing[0] or not _dropped(connection, exc):
                    raise
                connection.invalidate()
            finally:
                connection.close()  # back to the pool (an invalidated one is discarded)
        raise AssertionError("unreachable")

    def _each(self, items: Sequence[tuple[str, str]], rule: Callable[..., Any]) -> list[Any]:
        """`rule(index, state, now) -> (outcome, new state or None, expires_at)` applied to
        each bucket, in one transaction."""

        def decide(states: list[Any], now: int) -> tuple[list[Any], list[Any]]:
            applied = [rule(i, state, now) for i, state in enumerate(states)]
            return [a[0] for a in applied], [(a[1], a[2]) for a in applied]

        return self._transaction(items, decide)

    def _apply(
        self,
        cursor: Any,
        items: Sequence[tuple[str, str]],
        decide: _Decide[_T],
        writing: list[bool],
    ) -> _T:
        order = sorted(range(len(items)), key=lambda i: items[i])
        states: list[Any] = [None] * len(items)
        now = 0
        self._tx.cursor, self._tx.waiters = cursor, []
        for index in order:
            cursor.execute(self.sql.lock, items[index])
            row = cursor.fetchone()
            assert row is not None  # an upsert's RETURNING always has its row
            text, clock = row
            states[index] = json.loads(text) if text else None
            now = max(now, int(clock))
        try:
            outcome, writes = decide(states, now)
            writing[0] = True
            for changed in self._tx.waiters:
                changed.flush()
        finally:
            self._tx.cursor, self._tx.waiters = None, []
        for index in order:
            if writes[index] is KEEP:
                continue
            scope, bucket = items[index]
            new_state, expires_at = writes[index]
            if new_state is None:
                cursor.execute(self.sql.delete, (scope, bucket))
            else:
                encoded = json.dumps(new_state, separators=(",", ":"))
                cursor.execute(self.sql.write, (encoded, expires_at, scope, bucket))
        return outcome

    def _postgresql_transaction(
        self,
        connection: Any,
        items: Sequence[tuple[str, str]],
        decide: _Decide[_T],
        writing: list[bool],
    ) -> _T:
        # Pipelined: BEGIN (implicit) and the lock go in one round trip, the write and COMMIT
        # in a second.
        driver: Any = connection.driver_connection
        try:
            with driver.pipeline(), driver.cursor() as cursor:
                if not self.durable:
                    cursor.execute(_NOT_DURABLE)
                outcomes = self._apply(cursor, items, decide, writing)
                driver.commit()
            return outcomes
        except BaseException:
            if not driver.closed:
                driver.rollback()
            raise

    def _sqlite_transaction(
        self,
        connection: Any,
        items: Sequence[tuple[str, str]],
        decide: _Decide[_T],
        writing: list[bool],
    ) -> _T:
        driver: Any = connection.driver_connection
        isolation = driver.isolation_level
        driver.isolation_level = None  # we say BEGIN ourselves
        try:
            cursor = driver.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                outcomes = self._apply(cursor, items, decide, writing)
                cursor.execute("COMMIT")
            except BaseException:
                if driver.in_transaction:
                    driver.execute("ROLLBACK")
                raise
            finally:
                cursor.close()
            return outcomes
        finally:
            driver.isolation_level = isolation

    def _one(self, scope: str, bucket: str, rule: _Rule[_T]) -> _T:
        outcome: _T = self._each([(scope, bucket)], lambda _i, s, n: rule(s, n))[0]
        return outcome

    def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, tuple(params))
            rows = [tuple(r) for r in cursor.fetchall()]
            cursor.close()
            connection.commit()
            return rows
        finally:
            connection.close()

    def now(self) -> float:
        """The database's clock, epoch seconds: the clock every permit is timed by."""
        return int(self._read(self.sql.now, ())[0][0]) / 1000

    # --- a run's limits together --------------------------------------------------------

    def acquire_all(self, holder: str, requests: Sequence[PermitRequest]) -> Admission:
        """Pass a run (`holder`, its job id) through all its limits at once, in one
        transaction: either every one takes it (a debounce burst is claimed, a rate start is
        counted, a lease is taken), or none does. A refused run spends nothing: a concurrency
        wait does not burn rate permits, a rate wait does not hold a slot or close a burst.
        It only keeps (or takes) its place in the FIFO of a concurrency limit that refused it."""
        if not requests:
            raise ValueError("acquire_all needs at least one limit")

        limits = [
            Limit(r.kind, r.calls, _ms(r.period) if r.kind == RATE else 0, r.limit, _ms(r.ttl),
                  _ms(r.park))
            for r in requests
        ]  # fmt: skip

        def decide(states: list[Any], now: int) -> tuple[Admission, list[Any]]:
            made: dict[int, TableWaiters] = {}

            def waiters_of(index: int) -> TableWaiters:
                request = requests[index]
                return made.setdefault(index, TableWaiters(self, request.scope, request.bucket))

            decision = admit(
                holder, limits, states, now, DEBOUNCE_GRACE_MS, DEBOUNCE_KEEP_STARTED_MS,
                waiters_of,
            )  # fmt: skip
            for index, table in made.items():
                if index not in decision.changes:
                    table.discard()
            writes = [decision.changes.get(i, KEEP) for i in range(len(requests))]
            if decision.granted:
                return Admission(True, now / 1000, debounce=decision.claim), writes
            assert decision.refused is not None
            refused = requests[decision.refused]
            retry_in = decision.retry_in_ms / 1000
            return Admission(False, now / 1000, refused, retry_in, decision.position), writes

        return self._transaction([(r.scope, r.bucket) for r in requests], decide)

    def release_all(
        self, holder: str, held: Sequence[HeldSlot], claim: float | None = None
    ) -> list[HeldSlot]:
        """End a run's leases, in one transaction; the waiters now due a slot (as HeldSlots
        of their own), to wake early, best effort. With `claim` (seconds: the engines give a
        park time and a lease ttl), a woken waiter that does not ask within it is forgotten
        (`lease_release`)."""
        claim_ms = None if claim is None else _ms(claim)

        def rule(index: int, state: Any, now: int) -> tuple[list[HeldSlot], Any, int]:
            slot = held[index]
            leases = LeaseState.from_json(state, TableWaiters(self, slot.scope, slot.bucket))
            wake = lease_release(leases, holder, now, slot.limit, claim_ms)
            woken = [HeldSlot(slot.scope, slot.bucket, w, slot.limit) for w in wake]
            return woken, _kept(leases), leases.expires_at()

        outcomes = self._each([(s.scope, s.bucket) for s in held], rule)
        return [w for woken in outcomes for w in woken]

    # --- rate limits ------------------------------------------------------------------------

    def acquire_rate(self, scope: str, bucket: str, calls: int, period: float) -> RateGrant:
        """Count a start in the bucket unless `calls` starts lie in the last `period` seconds."""
        period_ms = _ms(period)

        def rule(state: Any, now: int) -> tuple[RateGrant, Any, int]:
            decision = rate_try_start(state or [], now, calls, period_ms)
            at = decision.starts[-1] if decision.granted else now
            grant = RateGrant(decision.granted, at / 1000, decision.retry_in_ms / 1000)
            return grant, decision.starts, rate_expires_at(decision.starts, period_ms)

        return self._one(scope, bucket, rule)

    # --- concurrency ------------------------------------------------------------------------

    def acquire_slot(
        self, scope: str, bucket: str, holder: str, limit: int, ttl: float, park: float
    ) -> SlotGrant:
        """Take one of the bucket's `limit` slots for `holder` (a job id), leased for `ttl`
        seconds; refused, the holder waits in the bucket's FIFO and asks again in `retry_in`
        (at most `park`) unless a release wakes it first."""

        def rule(state: Any, now: int) -> tuple[SlotGrant, Any, int]:
            leases = LeaseState.from_json(state, TableWaiters(self, scope, bucket))
            decision = lease_try_acquire(leases, holder, now, limit, _ms(ttl), _ms(park))
            grant = SlotGrant(
                decision.granted, now / 1000, decision.position, decision.retry_in_ms / 1000
            )
            return grant, _kept(leases), leases.expires_at()

        return self._one(scope, bucket, rule)

    def renew_slots(self, held: Sequence[HeldSlot], ttl: float) -> list[bool]:
        """Extend the leases of a worker's running jobs, all in one transaction; False for a
        run whose lease had expired and whose slot has been taken since."""
        ttl_ms = _ms(ttl)

        def rule(index: int, state: Any, now: int) -> tuple[bool, Any, int]:
            slot = held[index]
            leases = LeaseState.from_json(state)
            kept = lease_renew(leases, slot.holder, now, slot.limit, ttl_ms)
            return kept, _kept(leases), leases.expires_at()

        return self._each([(s.scope, s.bucket) for s in held], rule)

    def release_slot(
        self, scope: str, bucket: str, holder: str, limit: int, claim: float | None = None
    ) -> list[str]:
        """End `holder`'s lease; the waiters now due a slot (to wake early, best effort), each
        forgotten unless it asks within `claim` seconds when given."""
        claim_ms = None if claim is None else _ms(claim)

        def rule(state: Any, now: int) -> tuple[list[str], Any, int]:
            leases = LeaseState.from_json(state, TableWaiters(self, scope, bucket))
            wake = lease_release(leases, holder, now, limit, claim_ms)
            return wake, _kept(leases), leases.expires_at()

        return self._one(scope, bucket, rule)

    def due_round_robin(
        self, scope: str, limit: int, budget: int, after: str | None
    ) -> list[tuple[str, str]]:
        """Up to `budget` (bucket, holder) waiters due a slot now (a dead holder's lease ran
        out, or a wake-up was lost), taken one per bucket in turn, starting after bucket
        `after`: a sweep never serves one bucket's whole queue before another's one job.
        A read: the waiters still take their slots through `acquire_slot`."""
        running: dict[str, int] = {}
        now = int(self.now() * 1000)
        for bucket, text, _ in self._read(self.sql.scope_rows, (scope,)):
            leases = LeaseState.from_json(json.loads(text))
            leases.prune(now)
            running[str(bucket)] = len(leases.leases)
        due: dict[str, list[str]] = {}
        for (bucket,) in self._read(self.sql.w_scope, (scope,)):
            free = limit - running.get(str(bucket), 0)
            if free > 0:
                first = self._read(self.sql.w_first, (scope, bucket, now, free))
                if first:
                    due[str(bucket)] = [str(r[0]) for r in first]
        chosen: list[tuple[str, str]] = []
        last = after
        while due and len(chosen) < budget:
            bucket = next_key(list(due), last)
            assert bucket is not None
            chosen.append((bucket, due[bucket].pop(0)))
            if not due[bucket]:
                del due[bucket]
            last = bucket
        return chosen

    # --- debounce ---------------------------------------------------------------------------

    def debounce(
        self,
        scope: str,
        bucket: str,
        job_id: str,
        payload: Any,
        period: float,
        max_wait: float | None,
    ) -> DebounceTicket:
        """Collapse a dispatch into the bucket's open burst, or open one run by `job_id`."""
        max_wait_ms = None if max_wait is None else _ms(max_wait)

        def rule(state: Any, now: int) -> tuple[DebounceTicket, Any, int]:
            bursts = DebounceState.from_json(state)
            bursts.prune(now, DEBOUNCE_KEEP_STARTED_MS)
            ticket = debounce_dispatch(bursts, job_id, payload, now, _ms(period), max_wait_ms)
            expires = bursts.expires_at(DEBOUNCE_KEEP_STARTED_MS, DEBOUNCE_GRACE_MS)
            return ticket, bursts.to_json(), expires

        return self._one(scope, bucket, rule)

    def claim_debounced(self, scope: str, bucket: str, run_id: str) -> DebounceClaim:
        """A burst's run asks to start: `start` (with the last payload) once it is due."""

        def rule(state: Any, now: int) -> tuple[DebounceClaim, Any, int]:
            bursts = DebounceState.from_json(state)
            bursts.prune(now, DEBOUNCE_KEEP_STARTED_MS)
            claim = debounce_claim(bursts, run_id, now)
            kept = None if bursts.empty() else bursts.to_json()
            return claim, kept, bursts.expires_at(DEBOUNCE_KEEP_STARTED_MS, DEBOUNCE_GRACE_MS)

        return self._one(scope, bucket, rule)

    # --- upkeep and counts ------------------------------------------------------------------

    def counts(self) -> list[BucketCounts]:
        """Every bucket holding something now: running, waiting, recent starts."""
        found: dict[tuple[str, str], list[int]] = {}
        for scope, bucket, text, now in self._read(self.sql.all_rows, ()):
            state = json.loads(text)
            counts = found.setdefault((scope, bucket), [0, 0, 0])
            if isinstance(state, list):  # a rate bucket: its starts; the window is the scope's
                counts[2] = len(state)
            elif "bursts" in state:
                counts[1] = DebounceState.from_json(state).waiting()
            else:
                leases = LeaseState.from_json(state)
                leases.prune(int(now))
                counts[0] = len(leases.leases)
        for scope, bucket, waiting in self._read(self.sql.w_all, ()):
            found.setdefault((scope, bucket), [0, 0, 0])[1] += int(waiting)
        return [
            BucketCounts(scope, bucket, *counts)
            for (scope, bucket), counts in found.items()
            if any(counts)
        ]

    # --- collapsed dispatches ---------------------------------------------------------------

    def record_collapsed(self, job_id: str, served_by: str, keep: float) -> None:
        """A debounced dispatch `job_id` joined `served_by`'s run; kept `keep` seconds. A
        retried dispatch of the same id keeps its first record."""
        expires_at = int((self.now() + keep) * 1000)
        with self.engine.begin() as connection:
            connection.execute(
                _COLLAPSE, {"job_id": job_id, "served_by": served_by, "expires_at": expires_at}
            )

    def served_by(self, job_id: str) -> str | None:
        """The run a collapsed dispatch joined, None for any other job id."""
        with self.engine.connect() as connection:
            found = connection.execute(_SERVED_BY, {"job_id": job_id}).scalar()
        return None if found is None else str(found)

    def purge(self) -> int:
        """Delete the buckets whose state has run out, the waiters that stopped asking and the
        collapsed dispatches past their keep; how many rows."""
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            deleted = 0
            for sql in (self.sql.purge, self.sql.w_purge, self.sql.c_purge):
                cursor.execute(sql)
                deleted += int(cursor.rowcount or 0)
            cursor.close()
            connection.commit()
            return deleted
        finally:
            connection.close()


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _engine(url: str | None) -> Engine:
    """SQLite: the job log's own engine (its pragmas: WAL, busy_timeout). PostgreSQL: one of
    the store's own per URL, without the job log's pre-ping: a permit's transaction is two
    round trips, and a ping on every checkout would be a third; a dropped connection is
    retried instead (`PermitStore._transaction`)."""
    key = normalize_url(url) if url is not None else database_url()
    if make_url(key).get_backend_name() == "sqlite":
        return get_engine(key)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = create_engine(key, pool_size=10, max_overflow=40)
        return engine


def dispose_store_engines() -> None:
    """Close the store's pooled PostgreSQL connections (after fork, before dropping a
    database)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def _dropped(connection: Any, exc: BaseException) -> bool:
    """Was the error the connection's loss (worth one more try on a new one)?"""
    driver = getattr(connection, "driver_connection", None)
    return bool(getattr(driver, "closed", False)) or "closed" in str(exc).lower()


def _kept(leases: LeaseState) -> dict[str, Any] | None:
    return None if leases.empty() else leases.to_json()

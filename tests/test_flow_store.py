"""The permit store (jobyard.job_engine.flow.store) on real PostgreSQL and SQLite: its schema is
the migration's, its operations follow the limiter rules, and real processes contending for
the same buckets never get more than the limit (checked from their records), a SIGKILLed
holder's slot comes back at its lease's expiry. Prints the cost per acquire."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from jobyard.job_engine import db
from jobyard.job_engine.db.migrate import downgrade, upgrade
from jobyard.job_engine.flow.limiter import PARK_TURNS
from jobyard.job_engine.flow.store import (
    TABLE,
    WAITERS,
    HeldSlot,
    PermitStore,
    dispose_store_engines,
)
from tests.support import migrated_pg_database

SPAWN = multiprocessing.get_context("spawn")  # no engine or pool crosses a fork


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with migrated_pg_database("jobyard_test_flow") as url:
        yield url


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('flow') / 'jobyard.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url"))


def _unique(prefix: str) -> str:
    return f"{prefix}:{os.getpid()}:{time.monotonic_ns()}"


def test_the_migration_makes_the_stores_table(url: str) -> None:
    def ours(obj: Any, name: Any, type_: str, reflected: Any, compare_to: Any) -> bool:
        table = obj if type_ == "table" else getattr(obj, "table", None)
        return (name if type_ == "table" else getattr(table, "name", None)) in (TABLE, WAITERS)

    with db.get_engine(url).connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_object": ours, "compare_type": True}
        )
        assert compare_metadata(context, db.Base.metadata) == []


def test_the_migration_goes_down_and_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobyard.db'}"
    upgrade(url)
    downgrade(url, "0009_job_log_lean_indexes")
    with db.get_engine(url).connect() as connection:
        assert not db.get_engine(url).dialect.has_table(connection, TABLE)
        assert not db.get_engine(url).dialect.has_table(connection, WAITERS)
    upgrade(url)
    assert PermitStore(url).acquire_rate("rate:job:x", "", 1, 1.0).granted


def test_rate_grants_calls_per_period_then_says_when(url: str) -> None:
    store, scope = PermitStore(url), _unique("rate:job:t")
    grants = [store.acquire_rate(scope, "acme", 3, 2.0) for _ in range(4)]
    assert [g.granted for g in grants] == [True, True, True, False]
    refused = grants[3]
    assert 0 < refused.retry_in <= 2.0
    assert abs(refused.retry_in - (grants[0].at + 2.0 - refused.at)) < 0.002
    assert store.acquire_rate(scope, "other", 3, 2.0).granted  # keys count apart
    time.sleep(refused.retry_in)
    assert store.acquire_rate(scope, "acme", 3, 2.0).granted  # the moment it said
    assert abs(store.now() - time.time()) < 1.0  # the database's clock is the host's here


def test_slots_lease_wait_in_order_wake_and_expire(url: str) -> None:
    store, scope = PermitStore(url), _unique("concurrency:job:t")
    first = store.acquire_slot(scope, "acme", "j1", 1, 30.0, 60.0)
    second = store.acquire_slot(scope, "acme", "j2", 1, 30.0, 60.0)
    third = store.acquire_slot(scope, "acme", "j3", 1, 30.0, 60.0)
    assert first.granted and not second.granted and second.position == 0
    assert abs(second.retry_in - (first.at + 30.0 - second.at)) < 0.002  # at j1's expiry
    # one turn from a slot: one park time and a share of another (a backlog's asks spread)
    assert not third.granted and third.position == 1 and 60.0 <= third.retry_in < 120.0
    assert store.acquire_slot(scope, "beta", "b1", 1, 30.0, 60.0).granted
    counts = {(c.bucket, c.running, c.waiting) for c in store.counts() if c.scope == scope}
    assert counts == {("acme", 1, 2), ("beta", 1, 0)}
    assert store.release_slot(scope, "acme", "j1", 1) == ["j2"]  # the one to wake
    assert not store.acquire_slot(scope, "acme", "j3", 1, 30.0, 60.0).granted  # j2 is due
    assert store.acquire_slot(scope, "acme", "j2", 1, 0.3, 60.0).granted
    assert store.renew_slots([HeldSlot(scope, "acme", "j2", 1)], 0.3) == [True]
    time.sleep(0.35)  # j2's worker stopped renewing: its lease runs out
    assert store.due_round_robin(scope, 1, 10, None) == [("acme", "j3")]
    assert store.acquire_slot(scope, "acme", "j3", 1, 30.0, 60.0).granted
    assert store.renew_slots([HeldSlot(scope, "acme", "j2", 1)], 30.0) == [False]
    store.release_slot(scope, "acme", "j3", 1)
    store.release_slot(scope, "beta", "b1", 1)
    assert [c for c in store.counts() if c.scope == scope] == []  # empty rows are deleted


def test_a_long_queue_of_one_key_stays_out_of_its_buckets_row(url: str) -> None:
    # One tenant's backlog: each waiter is a row of its own, so an operation on the bucket
    # rewrites only its leases, whatever the queue's length, and the queue stays FIFO.
    store, scope = PermitStore(url), _unique("concurrency:job:long")
    assert store.acquire_slot(scope, "flood", "run", 1, 30.0, 60.0).granted
    for n in range(300):
        refused = store.acquire_slot(scope, "flood", f"w{n:03d}", 1, 30.0, 60.0)
        assert not refused.granted
    # counted up to PARK_TURNS + 1 turns of the limit, not to 299; that far back a waiter asks
    # again by itself after PARK_TURNS park times at least (releases wake it in its turn)
    assert refused.position == PARK_TURNS + 1
    assert refused.retry_in >= PARK_TURNS * 60.0
    (text,) = store._read(
        f"SELECT state FROM flow_permits WHERE scope = {'?' if store.sqlite else '%s'}", (scope,)
    )[0]
    assert len(text) < 200 and "w299" not in text
    assert [(c.running, c.waiting) for c in store.counts() if c.scope == scope] == [(1, 300)]
    holder = "run"
    for n in range(3):  # each release wakes the longest waiting, who takes the slot
        assert store.release_slot(scope, "flood", holder, 1) == [f"w{n:03d}"]
        assert not store.acquire_slot(scope, "flood", f"w{n + 1:03d}", 1, 30.0, 60.0).granted
        assert store.acquire_slot(scope, "flood", f"w{n:03d}", 1, 30.0, 60.0).granted
        holder = f"w{n:03d}"


def test_a_woken_waiter_that_never_asks_gives_up_its_turn_after_the_claim(url: str) -> None:
    # A waiter whose job went away while it waited far back (told to ask in an hour) does not
    # keep a freed slot from the next one for that hour: woken, it has the claim to ask.
    store, scope = PermitStore(url), _unique("concurrency:job:claim")
    assert store.acquire_slot(scope, "acme", "run", 1, 30.0, 60.0).granted
    assert not store.acquire_slot(scope, "acme", "gone", 1, 30.0, 60.0).granted
    assert not store.acquire_slot(scope, "acme", "next", 1, 30.0, 60.0).granted
    assert store.release_slot(scope, "acme", "run", 1, claim=0.3) == ["gone"]
    assert not store.acquire_slot(scope, "acme", "next", 1, 30.0, 60.0).granted  # gone's turn
    time.sleep(0.35)
    assert store.acquire_slot(scope, "acme", "next", 1, 30.0, 60.0).granted  # gone was forgotten
    store.release_slot(scope, "acme", "next", 1)


def test_due_waiters_are_swept_round_robin_across_keys(url: str) -> None:
    store, scope = PermitStore(url), _unique("concurrency:job:rr")
    last = None
    for key in ("a", "b", "c"):
        assert store.acquire_slot(scope, key, f"{key}-run", 2, 3.0, 60.0).granted
        last = store.acquire_slot(scope, key, f"{key}-run2", 2, 3.0, 60.0)
        assert last.granted
        for n in range(3):
            assert not store.acquire_slot(scope, key, f"{key}{n}", 2, 30.0, 60.0).granted
    assert last is not None
    time.sleep(max(0.0, last.at + 3.0 - store.now()) + 0.05)  # every holder died: 2 free a key
    swept = store.due_round_robin(scope, 2, 4, "a")
    assert swept == [("b", "b0"), ("c", "c0"), ("a", "a0"), ("b", "b1")]


def test_debounce_collapses_a_burst_into_its_first_jobs_run(url: str) -> None:
    store, scope = PermitStore(url), _unique("debounce:job:t")
    first = store.debounce(scope, "doc-42", "j1", {"v": 1}, 2.0, 5.0)
    time.sleep(0.01)  # a later dispatch, so a later due time (the clock counts milliseconds)
    second = store.debounce(scope, "doc-42", "j2", {"v": 2}, 2.0, 5.0)
    assert not first.joined and second.joined and second.run_id == "j1"
    assert second.due > first.due
    assert store.claim_debounced(scope, "doc-42", "j1").status == "wait"
    time.sleep(max(0.0, second.due / 1000 - store.now()) + 0.01)
    claim = store.claim_debounced(scope, "doc-42", "j1")
    assert (claim.status, claim.payload, claim.members) == ("start", {"v": 2}, ("j1", "j2"))
    assert store.claim_debounced(scope, "doc-42", "j1") == claim  # a rerun: the same burst
    assert store.debounce(scope, "doc-42", "j2", {"v": 2}, 2.0, 5.0) == second  # a retried call
    later = store.debounce(scope, "doc-42", "j3", {"v": 3}, 2.0, 5.0)
    assert not later.joined and later.run_id == "j3"  # the started burst takes no more


def test_purge_deletes_only_rows_that_ran_out(url: str) -> None:
    store, scope = PermitStore(url), _unique("rate:job:purge")
    store.acquire_rate(scope, "short", 1, 0.05)
    store.acquire_rate(scope, "long", 1, 600.0)
    time.sleep(0.1)
    store.purge()
    left = {c.bucket for c in store.counts() if c.scope == scope}
    assert left == {"long"}


def test_a_connection_the_server_dropped_is_replaced(pg_url: str) -> None:
    import psycopg

    from tests.support import PG_ADMIN_URL

    store, scope = PermitStore(pg_url), _unique("rate:job:dropped")
    assert store.acquire_rate(scope, "k", 5, 60.0).granted  # a pooled connection now exists
    database = pg_url.rpartition("/")[2]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()) AS t",
            (database,),
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    time.sleep(0.2)
    grant = store.acquire_rate(scope, "k", 5, 60.0)  # on a new connection, counted once
    assert grant.granted
    assert [c.recent_starts for c in store.counts() if c.scope == scope] == [2]


# --- real processes contending -----------------------------------------------------------------

RATE_CALLS, RATE_PERIOD = 5, 0.4
SLOT_LIMIT = 2
PROCESSES = 6
RUN_SECONDS = 3.0
RUNS_PER_WORKER = 10


def _rate_worker(url: str, scope: str, go: Any, out: Any) -> None:
    store = PermitStore(url)
    store.now()  # connected
    grants: list[tuple[str, float]] = []
    go.wait()
    end = time.time() + RUN_SECONDS
    for key in itertools.cycle(["a", "b"]):
        if time.time() > end:
            break
        grant = store.acquire_rate(scope, key, RATE_CALLS, RATE_PERIOD)
        if grant.granted:
            grants.append((key, grant.at))
        else:  # parks until the window allows, as a throttled job does
            time.sleep(min(grant.retry_in, 0.05))
    _hand_back(out, grants)


def _slot_worker(url: str, scope: str, worker: int, go: Any, out: Any) -> None:
    store = PermitStore(url)
    store.now()  # connected
    runs: list[tuple[str, float, float]] = []
    go.wait()
    for n in range(RUNS_PER_WORKER):  # a count, not a time: a loaded machine still contends
        key, holder = "ab"[n % 2], f"w{worker}-{n}"
        while True:
            grant = store.acquire_slot(scope, key, holder, SLOT_LIMIT, 10.0, 1.0)
            if grant.granted:
                break
            time.sleep(min(grant.retry_in, 0.005))
        began = time.time()  # the run: between holding the slot and giving it back
        time.sleep(0.02 + 0.01 * (worker % 3))  # longer than an acquire: runs overlap
        runs.append((key, began, time.time()))
        store.release_slot(scope, key, holder, SLOT_LIMIT)
    _hand_back(out, runs)


def _hand_back(out: Any, records: Any) -> None:
    """A worker's records to the test, and its connections closed before it exits."""
    dispose_store_engines()
    out.put(records)
    out.close()
    out.join_thread()


def _run_processes(target: Any, args: list[tuple[Any, ...]]) -> list[Any]:
    # Every process has imported and connected before any begins (a spawned one takes a
    # while on a loaded machine).
    go, out = SPAWN.Barrier(len(args) + 1), SPAWN.Queue()
    procs = [SPAWN.Process(target=target, args=(*a, go, out)) for a in args]
    for proc in procs:
        proc.start()
    go.wait(timeout=120)
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=120)  # a loaded machine can take a while to end a process
        assert proc.exitcode == 0, (proc, proc.exitcode)
    return results


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_contending_processes_never_exceed_the_rate(
    backend: str, pg_url: str, sqlite_url: str
) -> None:
    url = pg_url if backend == "postgresql" else sqlite_url
    scope = _unique("rate:job:contended")
    results = _run_processes(_rate_worker, [(url, scope)] * PROCESSES)
    starts: dict[str, list[float]] = {"a": [], "b": []}
    for grants in results:
        for key, at in grants:
            starts[key].append(at)
    for key, times in starts.items():
        times.sort()
        # no window of RATE_PERIOD holds more than RATE_CALLS starts (ms clock)
        gaps = [b - a for a, b in zip(times, times[RATE_CALLS:], strict=False)]
        assert min(gaps) >= RATE_PERIOD - 0.0005, (key, min(gaps))
        # and the limit was used: about calls per period over the run
        assert len(times) >= RATE_CALLS * (RUN_SECONDS / RATE_PERIOD) * 0.8, (key, len(times))
    print(f"\n{backend}: {PROCESSES} processes, starts per key {[len(t) for t in starts.values()]}")


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_contending_processes_never_hold_more_than_the_limit(
    backend: str, pg_url: str, sqlite_url: str
) -> None:
    url = pg_url if backend == "postgresql" else sqlite_url
    scope = _unique("concurrency:job:contended")
    results = _run_processes(_slot_worker, [(url, scope, w) for w in range(PROCESSES)])
    for key in "ab":
        runs = [(b, e) for r in results for k, b, e in r if k == key]
        assert len(runs) == PROCESSES * RUNS_PER_WORKER // 2
        edges = sorted([(b, 1) for b, _ in runs] + [(e, -1) for _, e in runs])
        running = peak = 0
        for _, step in edges:  # an end before a start at the same instant
            running += step
            peak = max(peak, running)
        assert peak == SLOT_LIMIT, (key, peak)  # reached, never passed
    began = min(b for r in results for _, b, _ in r)
    ended = max(e for r in results for _, _, e in r)
    total = sum(len(r) for r in results)
    print(f"\n{backend}: {PROCESSES} processes, {total / (ended - began):.0f} runs/s on 2 keys")


#: The killed holder's lease: long enough for the test to see it held on a loaded machine.
DOOMED_TTL = 5.0


def _holder_that_dies(url: str, scope: str, out: Any) -> None:
    store = PermitStore(url)
    out.put(store.acquire_slot(scope, "k", "doomed", 1, DOOMED_TTL, 60.0).granted)
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGKILL)  # holds its slot, never releases


def test_a_sigkilled_holders_slot_comes_back_at_its_lease_expiry(pg_url: str) -> None:
    store, scope = PermitStore(pg_url), _unique("concurrency:job:killed")
    out = SPAWN.Queue()
    proc = SPAWN.Process(target=_holder_that_dies, args=(pg_url, scope, out))
    proc.start()
    assert out.get(timeout=120) is True
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    refused = store.acquire_slot(scope, "k", "next", 1, 1.0, 60.0)
    assert not refused.granted and refused.retry_in <= DOOMED_TTL
    time.sleep(refused.retry_in)
    assert store.acquire_slot(scope, "k", "next", 1, 1.0, 60.0).granted


# --- cost ----------------------------------------------------------------------------------------


def _per_call_us(fn: Any, seconds: float = 1.5) -> tuple[str, int]:
    """`wall/client-CPU` microseconds per call (wall time includes waiting for the database
    and, on a loaded machine, for a core), and the number of calls."""
    fn()  # warm: the pool's connection, the row
    n, began, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - began < seconds:
        fn()
        n += 1
    wall = (time.perf_counter() - began) / n * 1e6
    return f"{wall:.0f}/{(time.process_time() - cpu) / n * 1e6:.0f}", n


def test_cost_per_acquire(pg_url: str, sqlite_url: str) -> None:
    lines = []
    stores = [
        ("postgresql", PermitStore(pg_url)),
        ("postgresql durable=False", PermitStore(pg_url, durable=False)),
        ("sqlite", PermitStore(sqlite_url)),
    ]
    for backend, store in stores:
        rate_scope, slot_scope = _unique("rate:job:cost"), _unique("concurrency:job:cost")
        rate_us, n1 = _per_call_us(
            lambda s=store, c=rate_scope: s.acquire_rate(c, "k", 10**6, 0.05)
        )
        full_us, n2 = _per_call_us(lambda s=store, c=rate_scope: s.acquire_rate(c, "f", 1, 600.0))
        holders = itertools.count()

        def slot(s: PermitStore = store, c: str = slot_scope, n: Any = holders) -> None:
            holder = f"h{next(n)}"
            assert s.acquire_slot(c, "k", holder, 10, 30.0, 60.0).granted
            s.release_slot(c, "k", holder, 10)

        slot_us, n3 = _per_call_us(slot)
        lines.append(
            f"{backend}: rate acquire {rate_us} us wall/CPU (granted, n={n1}), {full_us} us"
            f" (refused, n={n2}); slot acquire + release {slot_us} us (n={n3})"
        )
        assert store.acquire_rate(rate_scope, "k", 10**6, 0.05).granted
    print(f"\nload average {os.getloadavg()[0]:.1f}\n" + "\n".join(lines))

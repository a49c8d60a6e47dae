"""Dispatch in a transaction (`dispatch_job(..., connection=)`) against a plain `dispatch_job`
right after the commit, on PostgreSQL, with a real `jobyard worker` whose relay sends the outbox.

1. Commit-to-started latency: the job's `started_at` in the job log minus the moment the
   caller's commit returned, for jobs dispatched one at a time (interleaved with plain ones,
   each after a commit of its own, so both pay the same database and machine).
2. Relay throughput: `n_relay` jobs committed into the outbox at once, then sent by a relay
   pass loop in this process (a live worker heartbeat, no consumer): jobs per second.

Targets (issue 32): transactional p99 under 50 ms; relay at least 5,000 jobs/s.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid

from _common import ROOT, Proc, RedisServer, fresh_database, pct, set_env, wait_for


def main(n_latency: int = 300, n_relay: int = 20_000, gap: float = 0.02) -> dict[str, float]:
    with fresh_database() as database_url:
        redis_server = RedisServer().start()
        try:
            return _main(database_url, redis_server, n_latency, n_relay, gap)
        finally:
            redis_server.stop()


def _main(database_url: str, redis_server: RedisServer, n_latency: int, n_relay: int,
          gap: float) -> dict[str, float]:  # fmt: skip
    set_env(
        REDIS_URL=redis_server.url, USE_DRAMATIQ="true", DATABASE_URL=database_url,
        JOBYARD_JOB_LOG="true", JOBYARD_JOB_LOG_INTERVAL="0.1", JOBYARD_SCHEDULER="false",
        WORKER_METRICS_PORT="0", PYTHONPATH=str(ROOT),
    )  # fmt: skip
    import os

    from jobyard.dispatcher import dispatch_job, warm_up
    from jobyard.job_engine.db import get_engine

    warm_up()
    engine = get_engine()
    worker = Proc(["worker", "--queues", "default", "--processes", "1"], dict(os.environ))
    try:
        wait_for(lambda: "consuming" in worker.output(), timeout=120)
        time.sleep(1.0)  # the relay's LISTEN is up once the supervisor's threads started
        committed: dict[str, float] = {}
        plain: dict[str, float] = {}
        for i in range(n_latency):
            with engine.begin() as connection:
                handle = dispatch_job("system.echo", {"i": i}, connection=connection)
            committed[handle.job_id] = time.time()
            time.sleep(gap)
            with engine.begin() as connection:  # the app's own commit, then the dispatch
                connection.exec_driver_sql("SELECT 1")
            at = time.time()
            plain[dispatch_job("system.echo", {"i": i}).job_id] = at
            time.sleep(gap)
        started = _started_at(engine, [*committed, *plain])
        txn_ms = [(started[j] - at) * 1000 for j, at in committed.items() if j in started]
        plain_ms = [(started[j] - at) * 1000 for j, at in plain.items() if j in started]
    finally:
        worker.stop()
    print(f"commit-to-started, {len(txn_ms)} transactional jobs: p50 {pct(txn_ms, 50):.1f} ms"
          f"   p99 {pct(txn_ms, 99):.1f} ms   (target p99 < 50 ms)")  # fmt: skip
    print(f"commit-to-started, {len(plain_ms)} plain dispatch_job after commit: p50 "
          f"{pct(plain_ms, 50):.1f} ms   p99 {pct(plain_ms, 99):.1f} ms")  # fmt: skip
    rate = _relay_throughput(engine, redis_server, n_relay)
    print(f"relay throughput: {rate:,.0f} jobs/s over {n_relay} jobs   (target >= 5,000)")
    return {
        "txn_p50_ms": pct(txn_ms, 50), "txn_p99_ms": pct(txn_ms, 99),
        "plain_p50_ms": pct(plain_ms, 50), "plain_p99_ms": pct(plain_ms, 99),
        "relay_jobs_per_s": rate,
    }  # fmt: skip


def _started_at(engine, job_ids: list[str]) -> dict[str, float]:
    from sqlalchemy import text

    query = text(
        "SELECT job_id, extract(epoch FROM started_at) FROM job_log"
        " WHERE job_id = ANY(:ids) AND started_at IS NOT NULL"
    )

    def all_started() -> dict[str, float] | None:
        with engine.connect() as connection:
            rows = dict(connection.execute(query, {"ids": job_ids}).all())
        return rows if len(rows) == len(job_ids) else None

    try:
        return {k: float(v) for k, v in wait_for(all_started, timeout=60, interval=0.5).items()}
    except AssertionError:
        with engine.connect() as connection:
            rows = connection.execute(query, {"ids": job_ids}).all()
        print(f"(only {len(rows)} of {len(job_ids)} jobs started)")
        return {k: float(v) for k, v in rows}


def _relay_throughput(engine, redis_server: RedisServer, n: int) -> float:
    from jobyard.dispatcher import dispatch_many, get_dispatcher
    from jobyard.dispatcher.relay import OutboxRelay
    from jobyard.queue.client import get_client
    from jobyard.queue.store import JobStore

    with engine.begin() as connection:
        handles = dispatch_many([("system.echo", {"i": i}) for i in range(n)],
                                connection=connection)  # fmt: skip
    assert all(not isinstance(h, Exception) for h in handles)
    store = JobStore(get_client())
    worker_id = f"bench:{uuid.uuid4().hex[:6]}"
    beating = threading.Event()

    def beat() -> None:  # one live worker for the queue, all along (no consumer)
        while not beating.wait(1.0):
            store.heartbeat(worker_id, "bench-broker", ["default"])

    store.heartbeat(worker_id, "bench-broker", ["default"])
    threading.Thread(target=beat, daemon=True).start()
    relay = OutboxRelay(get_dispatcher())
    began = time.perf_counter()
    sent = 0
    try:
        while sent < n:
            taken = relay.relay_once()
            if not taken:
                break
            sent += taken
        elapsed = time.perf_counter() - began
    finally:
        beating.set()
    with engine.connect() as connection:
        left = connection.exec_driver_sql("SELECT count(*) FROM dispatch_outbox").scalar()
    print(f"(relay: {sent} rows taken, {left} left in the outbox)")
    return sent / elapsed


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=int, default=300, help="jobs per kind for latency")
    parser.add_argument("--relay", type=int, default=20_000, help="jobs for relay throughput")
    args = parser.parse_args()
    main(args.latency, args.relay)

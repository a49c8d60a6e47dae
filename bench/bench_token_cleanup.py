"""Benchmark `maintenance.token_cleanup` on PostgreSQL against one unbatched DELETE.

    uv run python bench/bench_token_cleanup.py [--rows 1000000] [--batch-size 5000]

Creates a scratch database `jobyard_bench_<random>` in the local cluster (admin connection:
--admin-url, default $JOBYARD_BENCH_PG_ADMIN_URL or postgresql://postgres@127.0.0.1:5432/test),
migrates it, and runs, each on an identical freshly loaded and analysed `tokens` table
(`--rows` expired tokens plus 10% still valid, loaded with INSERT ... SELECT generate_series):

1. the job, through the in-process engine (`run_inline`): batches of DELETE ... WHERE id IN
   (SELECT id ... LIMIT n), each its own transaction;
2. the baseline: a single `DELETE FROM tokens WHERE expires_at < now()`, one transaction.

Prints rows per second for both, their ratio, and how long each holds a transaction open.
The scratch database is dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

import psycopg

from jobyard.job_engine import env
from jobyard.job_engine.db import dispose_engines, get_engine
from jobyard.job_engine.db.migrate import upgrade
from jobyard.job_engine.inline import run_inline
from jobyard.job_engine.registry import get_spec

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def load(url: str, rows: int) -> None:
    """Empty `tokens`, insert `rows` expired and rows/10 valid tokens, then VACUUM ANALYZE."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("TRUNCATE tokens RESTART IDENTITY")
        connection.execute(
            "INSERT INTO tokens (user_id, token, expires_at, created_at) "
            "SELECT (g %% 10000)::text, 'expired-' || g, "
            "       now() - interval '1 day' - (g %% 86400) * interval '1 second', "
            "       now() - interval '30 days' "
            "FROM generate_series(1, %s) AS g",
            (rows,),
        )
        connection.execute(
            "INSERT INTO tokens (user_id, token, expires_at) "
            "SELECT (g %% 10000)::text, 'valid-' || g, now() + interval '1 day' "
            "FROM generate_series(1, %s) AS g",
            (max(1, rows // 10),),
        )
        connection.execute("VACUUM ANALYZE tokens")
        connection.execute("CHECKPOINT")


def count(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as connection:
        row = connection.execute(
            "SELECT count(*) FILTER (WHERE expires_at < now()), count(*) FROM tokens"
        ).fetchone()
        assert row is not None
        return row[0], row[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="expired tokens to delete")
    parser.add_argument("--batch-size", type=int, default=5_000)
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("JOBYARD_BENCH_PG_ADMIN_URL", DEFAULT_ADMIN_URL),
        help="a PostgreSQL database used to create and drop the scratch database",
    )
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")

    name = f"jobyard_bench_{uuid.uuid4().hex[:10]}"
    url = f"{args.admin_url.rpartition('/')[0]}/{name}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        upgrade(url)
        os.environ[env.DATABASE_URL] = url
        valid = max(1, args.rows // 10)
        print(f"database {name}: {args.rows:,} expired + {valid:,} valid tokens per run")

        t0 = time.perf_counter()
        load(url, args.rows)
        print(f"loaded in {time.perf_counter() - t0:.1f} s")
        # Warm up outside the timing: importing the job modules, opening the pooled connection.
        get_spec("maintenance.token_cleanup")
        with get_engine(url).connect() as connection:
            connection.exec_driver_sql("SELECT 1")
        t0 = time.perf_counter()
        result = run_inline("maintenance.token_cleanup", {"batch_size": args.batch_size})
        job_seconds = time.perf_counter() - t0
        expired_left, total_left = count(url)
        assert result["deleted"] == args.rows, result
        assert (expired_left, total_left) == (0, valid), (expired_left, total_left)

        load(url, args.rows)
        with psycopg.connect(url) as connection:
            t0 = time.perf_counter()
            deleted = connection.execute("DELETE FROM tokens WHERE expires_at < now()").rowcount
            connection.commit()
            base_seconds = time.perf_counter() - t0
        assert deleted == args.rows, deleted
        assert count(url) == (0, valid)
    finally:
        dispose_engines(url)
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    job_rate = args.rows / job_seconds
    base_rate = args.rows / base_seconds
    batches = result["batches"]
    print(
        f"maintenance.token_cleanup  batch_size={args.batch_size}: {job_seconds:8.2f} s  "
        f"{job_rate:12,.0f} rows/s  ({batches} batches, one transaction each, "
        f"mean {1000 * job_seconds / max(1, batches):.1f} ms per batch)"
    )
    print(
        f"baseline single DELETE           : {base_seconds:8.2f} s  {base_rate:12,.0f} rows/s  "
        f"(1 transaction held for {1000 * base_seconds:.0f} ms)"
    )
    print(f"ratio job/baseline throughput    : {job_rate / base_rate:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

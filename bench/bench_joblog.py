"""The dashboard's queries on a big job log: a million rows in `job_log` on PostgreSQL.

Fills a fresh database (server-side, with generate_series: a week of jobs over four queues, two
engines, twenty job names, the usual mix of states), runs VACUUM ANALYZE as autovacuum would,
then times each query the dashboard and the API make: listing pages (first, deep through the
cursor, filtered, searched by id), the per-queue graphs over an hour, a day and a week, and
reading a job's events. Each query runs warm, REPEAT times; the median and the worst are
printed against the 200 ms target.

    .venv/bin/python bench/bench_joblog.py [--rows 1000000] [--compare]

--compare also times the same queries with the indexes of migration 0005 (before 0006), to
show what the new indexes buy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import migrated_pg_database  # noqa: E402

TARGET_MS = 200.0
REPEAT = 15
FILL = """
INSERT INTO job_log (job_id, name, queue, engine, state, attempts, payload, result,
                     error_class, error_message, fallback_reason, progress,
                     enqueued_at, started_at, finished_at, duration_ms, state_at, events)
SELECT 'job-' || lpad(n::text, 8, '0'),
       'job.kind' || (n % 20),
       CASE WHEN n % 20 < 10 THEN 'default' WHEN n % 20 < 16 THEN 'data-sync'
            WHEN n % 20 < 19 THEN 'scheduled' ELSE 'billing' END,
       CASE WHEN n % 7 = 0 THEN 'temporal' ELSE 'dramatiq' END,
       s.state,
       CASE WHEN s.state IN ('dead', 'failed') THEN 3 ELSE 1 END,
       jsonb_build_object('user', n, 'text', repeat('x', 80)),
       CASE WHEN s.state = 'succeeded' THEN jsonb_build_object('ok', true) END,
       CASE WHEN s.state IN ('dead', 'failed') THEN 'RuntimeError' END,
       CASE WHEN s.state IN ('dead', 'failed') THEN 'RuntimeError: upstream said no' END,
       CASE WHEN n % 7 = 0 THEN 'no_live_workers' END,
       CASE WHEN s.state = 'running' THEN to_jsonb(0.5) END,
       t.enqueued, t.enqueued + t.wait,
       CASE WHEN s.state IN ('queued', 'running') THEN NULL ELSE t.enqueued + t.wait + t.run END,
       CASE WHEN s.state IN ('queued', 'running') THEN NULL
            ELSE (extract(epoch FROM t.run) * 1000)::bigint END,
       t.enqueued + t.wait + t.run, 3
FROM generate_series(1, :rows) AS n
CROSS JOIN LATERAL (SELECT
    :now - (n::float / :rows) * interval '7 days' AS enqueued,
    (random() * random() * 2000) * interval '1 millisecond' AS wait,
    (50 + random() * random() * random() * 20000) * interval '1 millisecond' AS run,
    random() AS r) AS t
CROSS JOIN LATERAL (SELECT CASE
    WHEN n < :rows / 2000 AND t.r < 0.5 THEN 'running' WHEN n < :rows / 2000 THEN 'queued'
    WHEN t.r < 0.03 THEN 'failed' WHEN t.r < 0.05 THEN 'dead' WHEN t.r < 0.06 THEN 'cancelled'
    ELSE 'succeeded' END AS state) AS s
"""
#: The job_log indexes of migration 0005, for --compare.
OLD_INDEXES = [
    "CREATE INDEX ix_job_log_state ON job_log (state)",
    "CREATE INDEX ix_job_log_name ON job_log (name)",
    "CREATE INDEX ix_job_log_enqueued_at ON job_log (enqueued_at)",
    "CREATE INDEX ix_job_log_finished_at ON job_log (finished_at)",
]
NEW_INDEXES = [
    "ix_job_log_enqueued_at_job_id", "ix_job_log_state_enqueued_at",
    "ix_job_log_name_enqueued_at", "ix_job_log_queue_enqueued_at", "ix_job_log_finished_at",
    "ix_job_log_job_id_prefix",
]  # fmt: skip


def fill(url: str, rows: int) -> None:
    from sqlalchemy import text

    from jobyard.job_engine.db import get_engine
    from jobyard.job_engine.db.jobstats import SPANS, backfill_sql

    engine = get_engine(url)
    started = time.perf_counter()
    with engine.begin() as connection:
        connection.execute(text(FILL), {"rows": rows, "now": datetime.now(UTC)})
        connection.execute(
            text(
                "INSERT INTO job_events (job_id, seq, at, kind, state, engine, attempts) "
                "SELECT 'job-00004242', n, now(), 'state', 'running', 'dramatiq', 1 "
                "FROM generate_series(1, 3) AS n"
            )
        )
        # the graphs' roll-ups, as the job log's writer keeps them (and migration 0006 fills them)
        for span in SPANS:
            connection.execute(text(backfill_sql("postgresql", span)))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE job_log"))
        connection.execute(text("VACUUM ANALYZE job_stats"))
        size = connection.execute(
            text("SELECT pg_size_pretty(pg_total_relation_size('job_log'))")
        ).scalar()
    print(f"filled {rows:,} rows in {time.perf_counter() - started:.1f} s; job_log is {size}")


def use_old_indexes(url: str) -> None:
    from sqlalchemy import text

    from jobyard.job_engine.db import get_engine

    with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        for name in NEW_INDEXES:
            c.execute(text(f"DROP INDEX {name}"))
        for statement in OLD_INDEXES:
            c.execute(text(statement))
        c.execute(text("VACUUM ANALYZE job_log"))


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    fn()  # warm: the first call pays for connections and statement preparation
    samples = []
    for _ in range(REPEAT):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), max(samples)


def queries() -> list[tuple[str, Callable[[], Any]]]:
    from jobyard.dispatcher.events import read_events
    from jobyard.dispatcher.lifecycle import Cursor, cursor_of, list_jobs
    from jobyard.dispatcher.stats import queue_history

    deep: list[Cursor] = []

    def page_deep() -> Any:
        """The 200th page of 50, reached through the cursor of the 199th."""
        if not deep:
            cursor = None
            for _ in range(199):
                cursor = cursor_of(list_jobs(limit=50, after=cursor)[-1])
            assert cursor is not None
            deep.append(cursor)
        return list_jobs(limit=50, after=deep[0])

    day_ago = datetime.now(UTC) - timedelta(days=1)
    return [
        ("list: first page", lambda: list_jobs(limit=50)),
        ("list: page 200 (cursor)", page_deep),
        ("list: state=dead", lambda: list_jobs(state="dead", limit=50)),
        ("list: state=running", lambda: list_jobs(state="running", limit=50)),
        ("list: queue=billing", lambda: list_jobs(queue="billing", limit=50)),
        ("list: name=job.kind7", lambda: list_jobs(name="job.kind7", limit=50)),
        ("list: engine=temporal", lambda: list_jobs(engine="temporal", limit=50)),
        ("list: dead in billing", lambda: list_jobs(state="dead", queue="billing", limit=50)),
        ("list: since a day ago", lambda: list_jobs(since=day_ago, limit=50)),
        ("list: search id prefix", lambda: list_jobs(job_id="job-0004", limit=50)),
        ("list: search exact id", lambda: list_jobs(job_id="job-00424242", limit=50)),
        ("graphs: last hour", lambda: queue_history(3600, 30)),
        ("graphs: last 24 hours", lambda: queue_history(86400, 30)),
        ("graphs: last 7 days", lambda: queue_history(7 * 86400, 30)),
        ("events of a job", lambda: read_events("job-00004242")),
    ]


def time_writes(url: str, batch: int = 1000, rounds: int = 5) -> None:
    """The writer's side: upserting batches of `batch` jobs (as the shipper does), each job
    first queued then finished, events and roll-ups included, on top of the big log."""
    from jobyard.job_engine.db import joblog

    queued, finished = [], []
    for r in range(rounds):
        now = time.time()
        ids = [f"write-{r}-{n}" for n in range(batch)]
        rows = [{"job_id": i, "name": "job.kind1", "queue": "default", "engine": "dramatiq",
                 "state": "queued", "enqueued_at": now, "state_at": now} for i in ids]  # fmt: skip
        started = time.perf_counter()
        joblog.upsert(rows, url)
        queued.append((time.perf_counter() - started) * 1000)
        done = [{**row, "state": "succeeded", "started_at": now, "finished_at": now + 0.2,
                 "duration_ms": 200, "state_at": now + 0.2, "attempts": 1,
                 "result": {"ok": True}, "progress": 1.0} for row in rows]  # fmt: skip
        started = time.perf_counter()
        joblog.upsert(done, url)
        finished.append((time.perf_counter() - started) * 1000)
    print(
        f"\nwriter: {batch} jobs per upsert (events and roll-ups included): new and queued "
        f"{statistics.median(queued):.0f} ms, finished {statistics.median(finished):.0f} ms "
        f"(median of {rounds}); {batch / statistics.median(finished) * 1000:,.0f} finishes/s"
    )


def run(label: str) -> dict[str, float]:
    print(f"\n{label}: median / worst of {REPEAT} warm runs (target < {TARGET_MS:.0f} ms)")
    results = {}
    for name, fn in queries():
        median, worst = timed(fn)
        verdict = "ok" if median < TARGET_MS else "SLOW"
        print(f"  {name:26s} {median:8.1f} ms  {worst:8.1f} ms  {verdict}", flush=True)
        results[name] = median
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--compare", action="store_true", help="also time the 0005 indexes")
    args = parser.parse_args()
    with migrated_pg_database("jobyard_bench_joblog") as url:
        os.environ["DATABASE_URL"] = url
        fill(url, args.rows)
        results = run("with migration 0006")
        time_writes(url)
        slow = [name for name, ms in results.items() if ms >= TARGET_MS]
        if args.compare:
            use_old_indexes(url)
            before = run("with the indexes of 0005 (before this change)")
            print("\n  speed-up per query: " + ", ".join(
                f"{name}: x{before[name] / max(results[name], 0.01):.0f}" for name in results
            ))  # fmt: skip
    print("\nall under target" if not slow else f"\nover target: {', '.join(slow)}")
    sys.exit(1 if slow else 0)


if __name__ == "__main__":
    main()

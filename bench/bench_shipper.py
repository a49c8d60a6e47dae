"""The job log's shipper alone: CPU per 1000 jobs in the shipper, Redis and PostgreSQL.

A private Redis and a fresh PostgreSQL database. The jobs' worker calls are made first, as a
worker would make them (so the job log's outbox fills), with Redis's CPU for them measured;
then the shipper empties the outbox and its own CPU (this process: the only thread working),
Redis's and the database backend's are measured. Three shapes of job:

- "complete": a job with no step, one `complete` call (what bench_throughput's echo does);
- "steps": `start`, three `ctx.progress` reports, `finish`, all within one shipping interval;
- "dispatched": "complete" for jobs whose "queued" row a web process wrote first (as
  `dispatch_job` does), so the shipper updates rows: the usual case in production;
- "started": `start` and `finish` of such jobs in one shipping interval: a job with a step
  that ends within half a second of its dispatch (the one-step job of bench_workloads).

    .venv/bin/python bench/bench_shipper.py [--jobs 5000] [--rounds 3]

Runs against whatever jobyard is importable, so a before/after comparison runs the same file
with PYTHONPATH pointing at the other checkout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path

from _common import RedisServer, fresh_database

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu(url: str) -> float:
    """CPU seconds of the PostgreSQL backends connected to the database of `url`."""
    import sqlalchemy as sa

    name = url.rsplit("/", 1)[1]
    admin = sa.create_engine(url.rsplit("/", 1)[0] + "/test")
    with admin.connect() as connection:
        pids = connection.execute(
            sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :name"), {"name": name}
        ).scalars()
        total = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
    admin.dispose()
    return total / CLOCK_TICKS


def redis_cpu(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run(shape: str, jobs: int, redis_url: str, database_url: str) -> dict[str, float]:
    from sqlalchemy import text

    from jobyard.job_engine.db import get_engine
    from jobyard.queue.client import get_client
    from jobyard.queue.messages import encode_job_message
    from jobyard.queue.store import JobStore
    from jobyard.worker.shipper import JobLogShipper

    client = get_client(redis_url)
    store = JobStore(client, log_changes=True)
    store.heartbeat("bench-worker", "bench-broker", ["default"])
    ids = [f"ship-{uuid.uuid4().hex[:12]}" for _ in range(jobs)]
    for job_id in ids:
        message = encode_job_message("system.echo", "default", job_id, {"n": 1}, seq=0)
        store.enqueue(
            job_id, "system.echo", "default", message.queue, message.redis_message_id,
            message.data, 60_000,
        )  # fmt: skip
    if shape in ("dispatched", "started"):  # the "queued" rows, as dispatch_job records them
        from jobyard.job_engine.db import joblog

        now = time.time()
        joblog.upsert(
            [{"job_id": job_id, "name": "system.echo", "queue": "default", "state": "queued",
              "engine": "dramatiq", "enqueued_at": now, "state_at": now, "payload": {"n": 1}}
             for job_id in ids],
            database_url,
        )  # fmt: skip
    shipper = JobLogShipper(store, 0.5, database_url=database_url)
    shipper.ship_all()  # connects, with nothing to ship yet
    redis_before = redis_cpu(client)
    for job_id in ids:
        if shape in ("complete", "dispatched"):
            store.complete(job_id, 0, resume=False, result={"ok": 1})
        elif shape == "started":
            store.start(job_id, "system.echo", 0, resume=False)
            store.finish(job_id, 0, "succeeded", result={"ok": 1})
        else:
            store.start(job_id, "system.echo", 0, resume=False)
            for step in range(3):
                store.record_progress(job_id, 0, str((step + 1) / 4))
            store.finish(job_id, 0, "succeeded", result={"ok": 1})
    worker_redis = redis_cpu(client) - redis_before

    redis_before, pg_before = redis_cpu(client), backend_cpu(database_url)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    shipper.ship_all()
    cpu = time.process_time() - cpu_before
    wall = time.perf_counter() - wall_before
    per = 1000 / jobs
    with get_engine(database_url).connect() as connection:
        events = connection.execute(text("SELECT count(*) FROM job_events")).scalar_one()
    return {
        "worker calls, redis": worker_redis * per,
        "shipper": cpu * per,
        "shipper, redis": (redis_cpu(client) - redis_before) * per,
        "shipper, postgres": (backend_cpu(database_url) - pg_before) * per,
        "shipper wall": wall * per,
        "events per job (x1000)": events / jobs / 1000,  # printed x1000, as the times
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shapes = ("complete", "steps", "dispatched", "started")
    results: dict[str, list[dict[str, float]]] = {shape: [] for shape in shapes}
    for _ in range(args.rounds):
        for shape in results:
            redis_server = RedisServer().start()
            try:
                with fresh_database() as database_url:
                    results[shape].append(run(shape, args.jobs, redis_server.url, database_url))
            finally:
                redis_server.stop()
    print(f"CPU ms per 1000 jobs (median of {args.rounds} rounds of {args.jobs} jobs)")
    for shape, runs in results.items():
        print(f"  {shape}:")
        for key in runs[0]:
            values = [r[key] * 1000 for r in runs]
            print(f"    {key:22s} {statistics.median(values):8.1f} ms   "
                  f"({' '.join(f'{v:.1f}' for v in values)})")  # fmt: skip


if __name__ == "__main__":
    main()

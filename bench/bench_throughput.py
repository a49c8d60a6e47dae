"""End-to-end throughput of `system.echo` through `jobyard worker` against a bare Dramatiq
actor with the same processes and threads, on the same kind of fresh Redis, in one run.

Target: jobyard at least 0.8x bare Dramatiq.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid

from _common import ROOT, Proc, RedisServer, fresh_database, set_env

QUEUE_MESSAGES = "dramatiq:default.msgs"


def drain_rate(redis_server: RedisServer, total: int, timeout: float = 300) -> float:
    """Jobs per second, from the first acknowledged message to the last."""
    client = redis_server.client()
    started_at = started_count = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = client.hlen(QUEUE_MESSAGES)
        now = time.perf_counter()
        if started_at is None and left < total:
            started_at, started_count = now, left
        if left == 0:
            return started_count / (now - started_at)
        time.sleep(0.005)
    raise TimeoutError(f"{client.hlen(QUEUE_MESSAGES)} jobs left after {timeout}s")


def run_bare(n: int, processes: int, threads: int) -> float:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    redis_server = RedisServer().start()
    try:
        env = {**os.environ, "REDIS_URL": redis_server.url, "PYTHONPATH": str(ROOT / "bench")}
        broker = RedisBroker(url=redis_server.url, namespace="dramatiq")
        noop = dramatiq.Actor(
            lambda job_id, payload: None, broker=broker, actor_name="noop",
            queue_name="default", priority=0, options={"max_retries": 0},
        )  # fmt: skip
        for i in range(n):
            noop.send(str(i), {"n": i})
        worker = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "_bare_worker", "--processes", str(processes),
             "--threads", str(threads)],
            env=env, cwd=ROOT / "bench", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            return drain_rate(redis_server, n)
        finally:
            worker.terminate()
            worker.wait(30)
            broker.close()
    finally:
        redis_server.stop()


def run_jobyard(
    n: int, processes: int, threads: int, extra_env: dict[str, str] | None = None
) -> float:
    redis_server = RedisServer().start()
    try:
        set_env(
            REDIS_URL=redis_server.url,
            USE_DRAMATIQ="true",
            WORKER_CONCURRENCY_DEFAULT=str(threads),
            **(extra_env or {}),
        )
        from jobyard.dispatcher import dispatch_job
        from jobyard.queue.client import get_client
        from jobyard.queue.store import JobStore

        store = JobStore(get_client())
        store.heartbeat(f"bench:{uuid.uuid4().hex[:6]}", "bench", ["default"])  # dispatch needs one
        for i in range(n):
            handle = dispatch_job("system.echo", {"n": i})
            assert handle.engine == "dramatiq"
        worker = Proc(
            ["worker", "--queues", "default", "--processes", str(processes)], dict(os.environ)
        )
        try:
            return drain_rate(redis_server, n)
        finally:
            worker.stop()
    finally:
        redis_server.stop()


def main(n: int = 20000, processes: int = 2, threads: int = 8, rounds: int = 3) -> dict[str, float]:
    """Alternates bare Dramatiq, jobyard with the job log and jobyard without it, and compares
    within each round: the machine is noisy."""
    rows = []
    with fresh_database() as database_url:
        os.environ["DATABASE_URL"] = database_url
        for _ in range(rounds):
            bare = run_bare(n, processes, threads)
            logged = run_jobyard(n, processes, threads, {"JOBYARD_JOB_LOG": "true"})
            unlogged = run_jobyard(n, processes, threads, {"JOBYARD_JOB_LOG": "false"})
            rows.append((bare, logged, unlogged))
            print(
                f"  round: bare {bare:6.0f}/s  jobyard {logged:6.0f}/s  "
                f"jobyard without job log {unlogged:6.0f}/s"
            )
    ratio = statistics.median(logged / bare for bare, logged, _ in rows)
    log_ratio = statistics.median(logged / unlogged for _, logged, unlogged in rows)
    bare_m, logged_m, unlogged_m = (statistics.median(col) for col in zip(*rows, strict=True))
    print(f"{processes} processes x {threads} threads, {n} no-op jobs, {rounds} rounds (medians)")
    print(f"bare dramatiq:                 {bare_m:8.0f} jobs/s")
    print(f"jobyard system.echo:           {logged_m:8.0f} jobs/s (job log on, PostgreSQL)")
    print(f"jobyard, job log off:          {unlogged_m:8.0f} jobs/s")
    print(f"jobyard / bare = {ratio:.2f}x   (target >= 0.8x)")
    print(f"job log on / off = {log_ratio:.2f}x   (target >= 0.8x)")
    return {"throughput_ratio": ratio, "job_log_ratio": log_ratio}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.n, args.processes, args.threads, args.rounds)

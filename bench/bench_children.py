"""Fan-out and fan-in (issue 30): a parent starts `n` trivial children with `ctx.children`.

1. Fan-in latency: from the last child's end (its `finished_at` in the job log) to the moment
   the parent's run after the wait began (its next step's clock), over `rounds` fan-outs.
2. Children per second: `n` over the time from the parent's fan-out to the last child's end,
   against `dispatch_many` of the same `n` jobs from this process to their last end, in the
   same run, on the same worker.

A private Redis, a fresh PostgreSQL job log, one `jobyard worker` (`--processes`, 8 threads
each); every child is checked `succeeded` and every parent's results in order.

    python bench/bench_children.py [--children 10000] [--rounds 5] [--processes 2]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from _common import ROOT, Proc, RedisServer, fresh_database, pct, set_env, wait_for


def main(children: int = 10_000, rounds: int = 5, processes: int = 2) -> dict[str, float]:
    with fresh_database() as database_url:
        redis_server = RedisServer().start()
        try:
            set_env(
                REDIS_URL=redis_server.url, USE_DRAMATIQ="true", DATABASE_URL=database_url,
                JOBYARD_JOB_LOG="true", JOBYARD_JOB_MODULES="_bench_children_jobs",
                JOBYARD_SCHEDULER="false", WORKER_METRICS_PORT="0",
                PYTHONPATH=f"{ROOT}/bench:{ROOT}",
            )  # fmt: skip
            return _main(children, rounds, processes)
        finally:
            redis_server.stop()


def _main(children: int, rounds: int, processes: int) -> dict[str, float]:
    from jobyard.dispatcher import dispatch_job, dispatch_many, get_job, warm_up
    from jobyard.job_engine.children import child_job_id

    warm_up()
    worker = Proc(["worker", "--queues", "default", "--processes", str(processes)],
                  dict(os.environ))  # fmt: skip
    latencies: list[float] = []
    fan_rates: list[float] = []
    many_rates: list[float] = []
    try:
        wait_for(lambda: "consuming" in worker.output(), timeout=120)
        warm = dispatch_job("bench.fan_parent", {"children": 50}).job_id  # imports, connections
        wait_for(lambda: get_job(warm).state == "succeeded", timeout=120, interval=0.2)
        for round_no in range(rounds):
            parent = dispatch_job("bench.fan_parent", {"children": children}).job_id
            wait_for(lambda p=parent: get_job(p).state == "succeeded", timeout=600, interval=0.2)
            moments = get_job(parent).result
            ids = [child_job_id(parent, 1, i, None) for i in range(children)]
            last_end = _last_end(ids)
            latencies.append(moments["resumed"] - last_end)
            fan_rates.append(children / (last_end - moments["began"]))

            began = time.time()
            handles = dispatch_many([("bench.fan_child", {"i": i}) for i in range(children)])
            many_ids = [h.job_id for h in handles if not isinstance(h, Exception)]
            assert len(many_ids) == children, "dispatch_many refused some jobs"
            many_rates.append(children / (_last_end(many_ids) - began))
            print(f"round {round_no + 1}: fan-in {latencies[-1] * 1000:.0f} ms after the last "
                  f"child; children {fan_rates[-1]:,.0f}/s, dispatch_many {many_rates[-1]:,.0f}/s",
                  flush=True)  # fmt: skip
    finally:
        worker.stop()
    ms = [s * 1000 for s in latencies]
    fan, many = sorted(fan_rates)[len(fan_rates) // 2], sorted(many_rates)[len(many_rates) // 2]
    print(f"fan-in, {children:,} children x {rounds}: last child's end -> parent resumed "
          f"p50 {pct(ms, 50):.0f} ms, p99 {pct(ms, 99):.0f} ms (max of {rounds})")  # fmt: skip
    print(f"children per second (median round): ctx.children {fan:,.0f}, dispatch_many of the "
          f"same jobs {many:,.0f} ({fan / many:.2f}x)")  # fmt: skip
    return {"fan_in_p50_ms": pct(ms, 50), "fan_in_p99_ms": pct(ms, 99),
            "children_per_s": fan, "dispatch_many_per_s": many}  # fmt: skip


def _last_end(job_ids: list[str]) -> float:
    """The latest `finished_at` of the jobs, once every one succeeded in the job log."""
    from sqlalchemy import text

    from jobyard.job_engine.db import get_engine

    query = text(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'),"
        " extract(epoch FROM max(finished_at)) FROM job_log WHERE job_id = ANY(:ids)"
    )

    def done() -> Any:
        with get_engine().connect() as connection:
            succeeded, last = connection.execute(query, {"ids": job_ids}).one()
        if succeeded < len(job_ids):
            return None
        return float(last)

    return float(wait_for(done, timeout=600, interval=0.5))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    main(args.children, args.rounds, args.processes)

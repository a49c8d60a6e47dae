"""Runs every benchmark in turn; each prints its ratios against baselines from the same run.

bench_workloads is issue 26's table: the jobs users run (no-op, one and three 5 ms steps, a
durable sleep) through jobyard, bare Dramatiq at its default prefetch and at jobyard's, Celery
(threads and prefork) and, for the fallback, bare Temporal; backlog drain and open-loop load,
CPU per job for every part, every job checked. The others measure what it does not:
dispatch_job's latency on an idle machine (bench_dispatch), bulk dispatch (bench_dispatch_many),
a paused Redis (bench_paused_redis), token cleanup (bench_token_cleanup) and a fan-out of
10,000 children (bench_children). bench_throughput
(no-op jobs at 4 x 8, RQ) and bench_temporal_fallback still run alone.

    python bench/run_all.py [--quick] [--only bench_workloads] [bench_workloads options...]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _module(name: str) -> Any:
    return importlib.import_module(name)


def benchmarks(quick: bool, workload_args: list[str]) -> list[tuple[str, Callable[[], object]]]:
    def workloads() -> object:
        module = _module("bench_workloads")
        return module.main(module.parse(["--quick", *workload_args] if quick else workload_args))

    if quick:
        return [
            ("bench_dispatch", lambda: _module("bench_dispatch").main(n=500, rounds=2)),
            ("bench_workloads", workloads),
        ]
    return [
        ("bench_dispatch", lambda: _module("bench_dispatch").main()),
        ("bench_dispatch_many", lambda: _module("bench_dispatch_many").main()),
        ("bench_workloads", workloads),
        ("bench_paused_redis", lambda: _module("bench_paused_redis").main()),
        ("bench_token_cleanup", lambda: _module("bench_token_cleanup").main()),
        ("bench_children", lambda: _module("bench_children").main()),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke test: small counts")
    parser.add_argument("--only", help="one benchmark by name, e.g. bench_workloads")
    args, rest = parser.parse_known_args()
    for title, run in benchmarks(args.quick, rest):
        if args.only and title != args.only:
            continue
        print(f"\n== {title} ==", flush=True)
        run()

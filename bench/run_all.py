"""Runs every benchmark in turn; each prints its ratios against baselines from the same run.

Together they print every row of issue 16's table: dispatch_job against bare send()
(bench_dispatch), end-to-end throughput and CPU per job at 2 x 8 with Celery and RQ beside it
and at 4 x 8 (bench_throughput), the Temporal fallback against a bare one-activity workflow
(bench_temporal_fallback) and bulk dispatch (bench_dispatch_many).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _module(name: str) -> Any:
    return importlib.import_module(name)


BENCHMARKS: list[tuple[str, Callable[[], object]]] = [
    ("bench_dispatch", lambda: _module("bench_dispatch").main()),
    ("bench_dispatch_many", lambda: _module("bench_dispatch_many").main()),
    # Enough jobs that no queue runs low before the ten rounds end (fewer slices give a less
    # steady ratio on this noisy machine): jobyard drains 60,000 in three slices at 2 x 8, and
    # 120,000 in five to seven at 4 x 8.
    (
        "bench_throughput, 2 processes x 8 threads",
        lambda: _module("bench_throughput").main(n=150000),
    ),
    (
        "bench_throughput, 4 processes x 8 threads (both saturate the machine)",
        lambda: _module("bench_throughput").main(n=200000, processes=4, peers=False),
    ),
    ("bench_paused_redis", lambda: _module("bench_paused_redis").main()),
    ("bench_temporal_fallback", lambda: _module("bench_temporal_fallback").main()),
    ("bench_token_cleanup", lambda: _module("bench_token_cleanup").main()),
]

if __name__ == "__main__":
    for title, run in BENCHMARKS:
        print(f"\n== {title} ==", flush=True)
        run()

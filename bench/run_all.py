"""Runs every benchmark in turn; each prints its ratio against a baseline from the same run."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = [
    "bench_dispatch",
    "bench_dispatch_many",
    "bench_throughput",
    "bench_paused_redis",
    "bench_temporal_fallback",
    "bench_token_cleanup",
]

if __name__ == "__main__":
    for name in BENCHMARKS:
        if not (Path(__file__).parent / f"{name}.py").exists():
            continue
        print(f"\n== {name} ==", flush=True)
        importlib.import_module(name).main()

"""Shared set-up for benchmarks: private services and percentile helpers."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import Proc, RedisServer, TemporalDevServer, free_port, wait_for  # noqa: E402

__all__ = [
    "ROOT",
    "Proc",
    "RedisServer",
    "TemporalDevServer",
    "free_port",
    "pct",
    "set_env",
    "wait_for",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summary_us(values: list[float]) -> str:
    return (
        f"p50 {pct(values, 50) * 1e6:8.1f} us   p99 {pct(values, 99) * 1e6:8.1f} us   "
        f"mean {statistics.fmean(values) * 1e6:8.1f} us"
    )


def set_env(**values: str) -> None:
    os.environ.update(values)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    from jobyard.dispatcher import reset_dispatcher
    from jobyard.queue.client import reset_clients

    reset_dispatcher()
    reset_clients()

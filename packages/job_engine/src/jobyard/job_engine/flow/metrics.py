"""Prometheus counts of flow control: what the permit store holds, read at scrape time
(`FlowCollector`), and the refusals, counted where they happen (`HELD`).

Key values (tenant ids) are unbounded, so per-key series are kept to the `top_keys` buckets
with the most waiting jobs; the per-scope totals count every key.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from jobyard.job_engine.flow.store import BucketCounts, PermitStore

#: Runs a limit refused (each refusal parks the job once; it is counted again if refused again).
HELD = Counter(
    "jobyard_flow_held_total", "Runs a flow-control limit refused, by limit", ["scope", "kind"]
)
TOP_KEYS = 20


class FlowCollector(Collector):
    """Per limit (`scope`): running leases, waiting jobs, starts in the current window; and the
    waiting jobs of the `top_keys` busiest keys."""

    def __init__(self, store: Callable[[], PermitStore], top_keys: int = TOP_KEYS) -> None:
        self.store = store
        self.top_keys = top_keys

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self.store().counts()
        except Exception:  # a scrape must not fail because the database is down
            return
        yield from families(counts, self.top_keys)


def families(counts: list[BucketCounts], top_keys: int = TOP_KEYS) -> list[GaugeMetricFamily]:
    running = GaugeMetricFamily(
        "jobyard_flow_running", "Runs holding a concurrency slot", labels=["scope"]
    )
    waiting = GaugeMetricFamily(
        "jobyard_flow_waiting", "Jobs waiting for a slot or a debounce", labels=["scope"]
    )
    recent = GaugeMetricFamily(
        "jobyard_flow_recent_starts", "Starts in the rate limit's current window", labels=["scope"]
    )
    by_key = GaugeMetricFamily(
        "jobyard_flow_waiting_by_key",
        f"Jobs waiting, for the {top_keys} keys with the most",
        labels=["scope", "key"],
    )
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for bucket in counts:
        total = totals[bucket.scope]
        total[0] += bucket.running
        total[1] += bucket.waiting
        total[2] += bucket.recent_starts
    for scope, (run, wait, starts) in sorted(totals.items()):
        running.add_metric([scope], run)
        waiting.add_metric([scope], wait)
        recent.add_metric([scope], starts)
    busiest = heapq.nlargest(
        top_keys, (b for b in counts if b.waiting), key=lambda b: (b.waiting, b.bucket)
    )
    for bucket in busiest:
        by_key.add_metric([bucket.scope, bucket.bucket], bucket.waiting)
    return [running, waiting, recent, by_key]

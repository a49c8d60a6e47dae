"""Prometheus counts of flow control: what the permit store holds, read at scrape time
(`FlowCollector`), the refusals, counted where they happen (`HELD`), and the runs a process
holds now (`HeldRuns`: the temporal-worker's held workflows, per queue and per key).

Key values (tenant ids) are unbounded, so per-key series are kept to the `top_keys` buckets
with the most waiting jobs; the per-scope totals count every key.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


#: Seconds a held run stays counted past the time it was told to ask again: the time its
#: engine takes to ask (a workflow task, a local activity), whose answer counts it again.
HELD_SLACK_SECONDS = 5.0


@dataclass(frozen=True)
class HeldRun:
    queue: str
    scope: str  # the limit that holds it
    kind: str
    key: str
    expires: float  # time.monotonic(): its retry time, plus HELD_SLACK_SECONDS


class HeldRuns(Collector):
    """The runs this process was last told are held, until they are granted, released, or past
    their retry time (they ask again then, and count again if still held): on Temporal, where no
    queue like Dramatiq's parked set holds them, the temporal-worker's held workflows, per queue
    (`jobyard_temporal_held`) and for the `top_keys` keys with the most
    (`jobyard_temporal_held_by_key`). A workflow asks in the process that runs its tasks (sticky),
    so each is counted once; Prometheus sums the processes."""

    def __init__(self, top_keys: int = TOP_KEYS) -> None:
        self.top_keys = top_keys
        self._runs: dict[str, HeldRun] = {}
        self._lock = threading.Lock()

    def held(
        self, job_id: str, queue: str, scope: str, kind: str, key: str, retry_in: float
    ) -> None:
        expires = time.monotonic() + retry_in + HELD_SLACK_SECONDS
        with self._lock:
            self._runs[job_id] = HeldRun(queue, scope, kind, key, expires)

    def let_go(self, job_id: str) -> None:
        with self._lock:
            self._runs.pop(job_id, None)

    def current(self) -> list[HeldRun]:
        now = time.monotonic()
        with self._lock:
            for job_id in [j for j, run in self._runs.items() if run.expires <= now]:
                del self._runs[job_id]
            return list(self._runs.values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runs = self.current()
        per_queue = GaugeMetricFamily(
            "jobyard_temporal_held",
            "Temporal workflows a flow-control limit holds, in this temporal-worker process",
            labels=["queue", "kind"],
        )
        for (queue, kind), count in sorted(Tally((r.queue, r.kind) for r in runs).items()):
            per_queue.add_metric([queue, kind], count)
        by_key = GaugeMetricFamily(
            "jobyard_temporal_held_by_key",
            f"Temporal workflows held, for the {self.top_keys} keys with the most",
            labels=["scope", "key"],
        )
        keys = Tally((r.scope, r.key) for r in runs)
        for (scope, key), count in heapq.nlargest(self.top_keys, keys.items(), key=_by_count):
            by_key.add_metric([scope, key], count)
        yield per_queue
        yield by_key


def _by_count(item: tuple[tuple[str, str], int]) -> tuple[int, tuple[str, str]]:
    return item[1], item[0]


#: This process's held runs (the temporal-worker's permit activity keeps it).
HELD_RUNS = HeldRuns()

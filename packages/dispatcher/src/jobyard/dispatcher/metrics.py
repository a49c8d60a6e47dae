"""Prometheus exposition for a web process (the API's /metrics) and for `jobyard worker`."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from jobyard.job_engine import env


class QueueCollector(Collector):
    """Queue depth, in-flight, delayed, dead and live workers, read from Redis at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from jobyard.dispatcher.lifecycle import queue_stats

        families = {
            field: GaugeMetricFamily(f"jobyard_queue_{field}", help_, labels=["queue"])
            for field, help_ in (
                ("depth", "Jobs waiting on the queue"),
                ("in_flight", "Jobs fetched by a worker and not finished"),
                ("delayed", "Jobs waiting for a backoff, a durable sleep or a delay"),
                ("held", "Jobs waiting for a flow-control limit (rate, slot, debounce)"),
                ("dead", "Dead letters in the job log"),
                ("live_workers", "Workers with a recent heartbeat"),
            )
        }
        try:
            stats = queue_stats()
        except Exception:  # a scrape must not fail because Redis or the database is down
            stats = []
        for queue in stats:
            for field, family in families.items():
                family.add_metric([queue.name], getattr(queue, field))
        yield from families.values()
        yield from _job_log_backlog()


def _job_log_backlog() -> Iterator[GaugeMetricFamily]:
    """Dramatiq job changes not yet in the job log: grows while the database (or every
    worker's shipper) is down."""
    from jobyard.dispatcher.lifecycle import job_log_backlog

    try:
        backlog = job_log_backlog()
    except Exception:  # a scrape must not fail because Redis is down
        return
    family = GaugeMetricFamily(
        "jobyard_job_log_backlog", "Dramatiq job changes waiting to be written to the job log"
    )
    family.add_metric([], backlog)
    yield family


def process_registry() -> CollectorRegistry:
    """This process's metrics, or every worker process's when they share a multiprocess dir."""
    if os.environ.get(env.PROMETHEUS_MULTIPROC_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def render(include_queues: bool = True) -> tuple[bytes, str]:
    body = generate_latest(process_registry())
    if include_queues:
        queues = CollectorRegistry(auto_describe=False)
        queues.register(QueueCollector())
        flow = flow_collector()
        if flow is not None:
            queues.register(flow)
        body += generate_latest(queues)
    return body, CONTENT_TYPE_LATEST


def flow_collector() -> Collector | None:
    """Flow control's counts per limit and per busiest keys (jobyard.job_engine.flow.metrics),
    read from the permit store at scrape time: only when a job or queue declares a limit (the
    store is not touched otherwise)."""
    from jobyard.job_engine import registry

    if not any(spec.limited for spec in registry):
        return None
    from jobyard.job_engine.flow import runtime
    from jobyard.job_engine.flow.metrics import FlowCollector

    return FlowCollector(runtime.permit_store)

"""Prometheus metrics: worker processes share one endpoint; the web process counts fallbacks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx

from jobyard.dispatcher import dispatch_job
from jobyard.dispatcher.metrics import render
from tests.support import free_port, metric_samples, metric_value, wait_for


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on `port`, from the kernel's own tables."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    # the kernel prints each 32-bit word in host (little-endian) order
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    found.add(socket.inet_ntop(family, raw))
    return found


def test_worker_processes_share_one_metrics_endpoint(engines, monkeypatch, tmp_path):
    port = free_port()
    monkeypatch.setenv("WORKER_METRICS_PORT", str(port))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    engines.start_worker(queues="default", processes=2)
    handles = [dispatch_job("system.echo", {"n": i}) for i in range(20)]
    for handle in handles:
        assert engines.wait(handle.job_id).state == "succeeded"
    url = f"http://127.0.0.1:{port}/metrics"

    def counted() -> bool:
        samples = metric_samples(httpx.get(url, timeout=5).text)
        return (
            metric_value(samples, "jobyard_jobs_total", name="system.echo", outcome="succeeded")
            == 20
        )

    wait_for(counted, timeout=15, interval=0.3)
    # loopback by default: the endpoint has no token (WORKER_METRICS_HOST opens it wider)
    assert listening_addresses(port) == {"127.0.0.1"}
    samples = metric_samples(httpx.get(url, timeout=5).text)
    assert metric_value(samples, "jobyard_job_duration_seconds_count", name="system.echo") == 20


def test_fallbacks_by_reason_and_queue_depth(engines, monkeypatch):
    engines.start_temporal_worker()
    monkeypatch.setenv("USE_DRAMATIQ", "false")
    before = metric_value(
        metric_samples(render()[0].decode()), "jobyard_fallbacks_total", reason="flag_off"
    )
    for _ in range(3):
        dispatch_job("system.echo", {})
    monkeypatch.setenv("USE_DRAMATIQ", "true")
    engines.start_worker(queues="data-sync")  # default has no worker: its jobs would fall back
    body, content_type = render()
    samples = metric_samples(body.decode())
    assert content_type.startswith("text/plain")
    assert metric_value(samples, "jobyard_fallbacks_total", reason="flag_off") - before == 3
    assert metric_value(samples, "jobyard_queue_live_workers", queue="data-sync") == 1
    assert metric_value(samples, "jobyard_queue_live_workers", queue="default") == 0


_FORKED_COUNTS = """
import os, sys
from prometheus_client import CollectorRegistry, multiprocess
from jobyard.job_engine import metrics

metrics.JOBS.labels("a.job", "default", "dramatiq", "succeeded").inc()
child = os.fork()
if child == 0:
    metrics.JOBS.labels("a.job", "default", "dramatiq", "succeeded").inc(10)
    os._exit(0)
os.waitpid(child, 0)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
print(registry.get_sample_value(
    "jobyard_jobs_total",
    {"name": "a.job", "queue": "default", "engine": "dramatiq", "outcome": "succeeded"},
))
print(sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])))
print(os.getpid(), child)
"""


def test_a_forked_process_counts_in_a_file_of_its_own(tmp_path):
    """Multiprocess values read the process id once per process: a fork must still be seen,
    or the child would write into its parent's file (and its counts be lost or doubled)."""
    script = subprocess.run(
        [sys.executable, "-c", _FORKED_COUNTS],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    total, files, pids = script.stdout.splitlines()
    parent, child = pids.split()
    assert float(total) == 11.0
    assert files == str(sorted([f"counter_{parent}.db", f"counter_{child}.db"]))

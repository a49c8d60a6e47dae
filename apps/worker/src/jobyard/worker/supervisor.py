"""`jobyard worker`: starts N worker processes, restarts any that die (taking back the messages
a dead one held at once, see jobyard.queue.reclaim), forwards SIGTERM, and ships the job log of
their jobs from Redis to the database (see shipper.py)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import FrameType

from jobyard.job_engine import env
from jobyard.worker.liveness import new_worker_token, worker_id_of

log = logging.getLogger("jobyard.worker")
RESTART_DELAY = 1.0
#: Extra seconds beyond the grace period before a child that ignores SIGTERM is killed.
KILL_MARGIN = 5.0


class _Child:
    """A worker process, and the token of its worker id (`host:pid:token`)."""

    def __init__(self, queues: str) -> None:
        self.token = new_worker_token()
        module = "jobyard.worker.process"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--queues", queues, "--worker-token", self.token]
        )

    def reclaim(self, queues: list[str]) -> None:
        """The messages the exited process held go back to their queues now, as suspects (see
        jobyard.queue.reclaim), with how it ended. If Redis cannot be reached, the sweep that
        finds its heartbeat old does it later. Its queue heartbeat is left to expire: the
        restarted process beats before then, and a queue seen without a live worker meanwhile
        would send its jobs to Temporal."""
        from jobyard.job_engine.db import joblog
        from jobyard.queue.client import get_client
        from jobyard.queue.dramatiq_compat import broker_id_of
        from jobyard.queue.reclaim import exit_description, reclaim
        from jobyard.queue.store import JobStore

        host, pid = socket.gethostname(), self.proc.pid
        worker_id = worker_id_of(host, pid, self.token)
        died = exit_description(host, pid, self.proc.returncode)
        try:
            # With the job log on, a job finished dead here is shipped as its workers' are.
            client = get_client(timeout=env.get_float(env.WORKER_REDIS_TIMEOUT))
            store = JobStore(client, log_changes=joblog.enabled())
            for queue in queues:
                reclaim(store, queue, dead=[(broker_id_of(worker_id, queue), died)])
        except Exception as exc:
            log.warning("could not take back the messages of worker process %d: %s", pid, exc)


def _serve_metrics() -> None:
    """One /metrics for all worker processes: they write to a shared multiprocess directory."""
    port = env.get_int(env.WORKER_METRICS_PORT)
    if port <= 0:
        return
    if not os.environ.get(env.PROMETHEUS_MULTIPROC_DIR):
        os.environ[env.PROMETHEUS_MULTIPROC_DIR] = tempfile.mkdtemp(prefix="jobyard-metrics-")
    from prometheus_client import start_http_server

    from jobyard.dispatcher.metrics import process_registry

    # Loopback by default: the metrics carry job names and queue sizes and have no token, so
    # reaching them from elsewhere (a scraper in another container) is an operator's choice.
    host = env.get_str(env.WORKER_METRICS_HOST)
    try:
        start_http_server(port, addr=host, registry=process_registry())
    except OSError as exc:  # another worker on this host has the port: run without, say so
        log.warning("metrics not served: %s:%d unavailable (%s)", host, port, exc)
        return
    log.info("worker metrics on %s:%d/metrics", host, port)


def _start_shipper(stop: threading.Event) -> threading.Thread | None:
    """The job log's shipper; the worker processes mark changed jobs for it."""
    from jobyard.job_engine.db import joblog

    if not joblog.enabled():
        return None
    from jobyard.queue.client import get_client
    from jobyard.queue.store import JobStore
    from jobyard.worker.shipper import JobLogShipper

    store = JobStore(get_client(timeout=env.get_float(env.WORKER_REDIS_TIMEOUT)))
    return JobLogShipper(store, env.get_float(env.JOB_LOG_INTERVAL)).start(stop)


def run_workers(queues: list[str], processes: int) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    joined = ",".join(queues)
    _serve_metrics()
    children = [_Child(joined) for _ in range(processes)]
    shipper_stop = threading.Event()
    shipper = _start_shipper(shipper_stop)  # after the spawn: its imports overlap theirs
    stopping = threading.Event()
    from jobyard.dispatcher.scheduler import start_scheduler_thread

    start_scheduler_thread(stopping, role="worker")  # every worker schedules; none leads
    from jobyard.dispatcher.relay import start_relay_thread

    start_relay_thread(stopping)  # the dispatch outbox's relay: every worker runs one

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log.info("started %d worker process(es) for %s", processes, joined)
    while not stopping.is_set():
        for i, child in enumerate(children):
            if child.proc.poll() is not None and not stopping.is_set():
                log.error(
                    "worker process %d exited with %s; restarting",
                    child.proc.pid,
                    child.proc.returncode,
                )
                child.reclaim(queues)
                if not stopping.wait(RESTART_DELAY):  # no respawn once a stop was asked for
                    children[i] = _Child(joined)
        stopping.wait(0.5)
    deadline = time.monotonic() + env.get_float(env.WORKER_SHUTDOWN_GRACE) + KILL_MARGIN
    code = 0
    for child in children:
        try:
            code |= child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            code |= 1
    if shipper is not None:  # the last jobs' changes, now that no worker makes more
        shipper_stop.set()
        shipper.join(KILL_MARGIN)
    return code

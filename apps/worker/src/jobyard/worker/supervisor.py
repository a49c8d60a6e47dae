"""`jobyard worker`: starts N worker processes, restarts any that die, forwards SIGTERM."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

from jobyard.job_engine import env

log = logging.getLogger("jobyard.worker")
RESTART_DELAY = 1.0
#: Extra seconds beyond the grace period before a child that ignores SIGTERM is killed.
KILL_MARGIN = 5.0


def _spawn(queues: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobyard.worker.process", "--queues", queues])


def run_workers(queues: list[str], processes: int) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    joined = ",".join(queues)
    children = [_spawn(joined) for _ in range(processes)]
    stopping = threading.Event()

    def request_stop(signum, _frame):
        stopping.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log.info("started %d worker process(es) for %s", processes, joined)
    while not stopping.is_set():
        for i, child in enumerate(children):
            if child.poll() is not None and not stopping.is_set():
                log.error(
                    "worker process %d exited with %s; restarting", child.pid, child.returncode
                )
                time.sleep(RESTART_DELAY)
                children[i] = _spawn(joined)
        stopping.wait(0.5)
    deadline = time.monotonic() + env.get_float(env.WORKER_SHUTDOWN_GRACE) + KILL_MARGIN
    code = 0
    for child in children:
        try:
            code |= child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            code |= 1
    return code

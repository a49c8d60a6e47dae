"""`jobyard temporal-worker`: the Temporal worker in a child process, started again when it dies.

A step that kills its process (`os._exit`, a segfault, the OOM killer) takes the whole Temporal
worker with it: every step running beside it, the workflows, the rescue, the relay. Temporal
retries those steps once their heartbeats stop (each death an attempt, bounded by the job's
retry policy), but only while some worker polls. So this process does nothing but keep one
polling: it starts `jobyard.temporal_worker.process`, forwards SIGTERM and SIGINT, and starts
it again after an exit it did not ask for, waiting longer each time it dies young (a worker that
cannot start at all is not restarted in a tight loop)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

from jobyard.job_engine import env

log = logging.getLogger("jobyard.temporal_worker")

#: Seconds before the first restart; doubled for each death within YOUNG of the start, up to MAX.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
#: A worker that ran at least this many seconds died of a job, not of its start: delay reset.
YOUNG = 30.0
#: Extra seconds beyond the grace period before a worker that ignores SIGTERM is killed.
KILL_MARGIN = 5.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILLed when this supervisor dies, however it dies, so a
    supervisor killed outright (an operator's `kill -9`, a container stop) leaves no worker
    polling that nothing supervises."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the child outlives it
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _start(queues: list[str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "jobyard.temporal_worker.process", "--queues", ",".join(queues)]
    return subprocess.Popen(argv, preexec_fn=_die_with_parent)  # before any thread starts


def supervise(queues: list[str]) -> int:
    """Runs the worker until SIGTERM or SIGINT; its exit code then."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    stopping = threading.Event()
    child = _start(queues)

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    delay, started = RESTART_DELAY, time.monotonic()
    while not stopping.is_set():
        if child.poll() is None:
            stopping.wait(0.5)
            continue
        if time.monotonic() - started >= YOUNG:
            delay = RESTART_DELAY
        log.error("Temporal worker process %d exited with %s; restarting in %.0f s",
                  child.pid, child.returncode, delay)  # fmt: skip
        if stopping.wait(delay):
            break
        child, started = _start(queues), time.monotonic()
        delay = min(MAX_RESTART_DELAY, delay * 2)
    try:
        return child.wait(env.get_float(env.WORKER_SHUTDOWN_GRACE) + KILL_MARGIN)
    except subprocess.TimeoutExpired:
        child.kill()
        return 1

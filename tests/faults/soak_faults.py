"""The faults the soak (tests/faults/soak.py) injects, one every few minutes, each a fault of the
`make chaos` table done to a running system rather than a fresh one: it acts, waits until the
system is whole again (processes restarted, servers back) and returns.

Picked in rounds: each round is every kind once, in an order shuffled by the soak's seed, so an
hour (eleven faults) meets all ten kinds and one twice.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jobyard.dispatcher import get_job
from tests.faults.procs import Cluster, child_pids, database_away
from tests.support import Proc

if TYPE_CHECKING:
    from tests.faults.scenarios import Load
    from tests.faults.temporal_crash import CrashableTemporal


@dataclass
class World:
    """What a fault may act on: the soak's Redis and workers (in `cluster`), the current
    `jobyard worker` and `jobyard temporal-worker` (replaced when one is restarted), the Temporal
    server, the job log's database, and the load (for the poison job). The witnesses, a
    `jobyard worker` of their own queue and a second temporal worker, are never a fault's
    target: their memory over the whole run is the growth target."""

    cluster: Cluster
    worker: Proc
    temporal_worker: Proc
    witness: Proc
    temporal_witness: Proc
    temporal: CrashableTemporal
    database_url: str
    poison: Load
    restarts: dict[str, int] = field(default_factory=dict)

    def restarted(self, what: str) -> None:
        self.restarts[what] = self.restarts.get(what, 0) + 1


def redis_sigkill(w: World) -> str:
    w.cluster.redis.sigkill()
    time.sleep(2)
    w.cluster.redis.start()
    return "redis SIGKILLed, restarted on its AOF 2 s later"


def redis_sigstop(w: World) -> str:
    w.cluster.redis.pause()
    time.sleep(6)
    w.cluster.redis.resume()
    return "redis SIGSTOPped 6 s"


def redis_restart_empty(w: World) -> str:
    w.cluster.redis.sigkill()
    w.cluster.redis.wipe()
    time.sleep(1)
    w.cluster.redis.start()
    return "redis SIGKILLed and restarted empty 1 s later"


def worker_process_sigkill(w: World) -> str:
    """One worker process (a child of the supervisor) SIGKILLed mid-job: the supervisor starts
    another, the reclaim requeues what it held."""
    children = child_pids(w.worker.pid)
    if not children:
        return "no worker process to kill"
    victim = random.choice(children)
    os.kill(victim, signal.SIGKILL)
    return f"worker process {victim} SIGKILLed"


def dramatiq_workers_sigkill(w: World) -> str:
    """Every Dramatiq worker of the default queue SIGKILLed and kept down past the heartbeat
    timeout and a rescue pass (the queue's jobs move to Temporal), then started again; the
    witness serves another queue."""
    Cluster.sigkill(w.worker)
    env = w.cluster.env
    time.sleep(float(env["WORKER_HEARTBEAT_TIMEOUT"]) + float(env["JOBYARD_RESCUE_INTERVAL"]))
    w.worker = w.cluster.start_worker()
    w.restarted("worker")
    return "every dramatiq worker of the default queue SIGKILLed, restarted 15 s later"


def worker_sigterm(w: World) -> str:
    exit_s = Cluster.sigterm(w.worker)
    w.worker = w.cluster.start_worker()
    w.restarted("worker")
    return f"jobyard worker SIGTERMed (exited in {exit_s:.1f} s), restarted"


def temporal_worker_sigkill(w: World) -> str:
    """One of the two temporal workers SIGKILLed (the other retries its steps), restarted."""
    Cluster.sigkill(w.temporal_worker)
    w.temporal_worker = w.cluster.start_temporal_worker()
    w.restarted("temporal-worker")
    return "one of two temporal workers SIGKILLed, restarted"


def temporal_server_sigkill(w: World) -> str:
    w.temporal.sigkill()
    time.sleep(2)
    w.temporal.start()
    return "temporal server SIGKILLed, restarted on its database 2 s later"


def poison_job(w: World) -> str:
    """A job whose step kills its worker process (os._exit), among the load; the fault lasts
    until the job is final (dead after its attempts, each death a worker process restarted)."""
    tag = f"poison-{time.monotonic_ns()}"
    attempt = w.poison.dispatch(tag)
    if attempt.job_id is None:
        return f"poison job refused: {attempt.error}"
    began = time.monotonic()
    state = None
    while time.monotonic() - began < 120 and state not in ("failed", "dead", "succeeded"):
        time.sleep(1)
        with contextlib.suppress(Exception):  # unreadable a moment: ask again
            state = get_job(attempt.job_id).state
    return f"poison job {attempt.job_id} {state} after {time.monotonic() - began:.0f} s"


def joblog_db_blink(w: World) -> str:
    """The job log's database refuses connections for 15 s and every open one is cut: the
    soak's own database only (ALLOW_CONNECTIONS), never the shared server."""
    cut = database_away(w.database_url.rpartition("/")[2], 15)
    return f"job log database refused connections 15 s ({cut} cut)"


KINDS: dict[str, Callable[[World], str]] = {
    "redis-sigkill": redis_sigkill,
    "redis-sigstop": redis_sigstop,
    "redis-restart-empty": redis_restart_empty,
    "worker-process-sigkill": worker_process_sigkill,
    "dramatiq-workers-sigkill": dramatiq_workers_sigkill,
    "worker-sigterm": worker_sigterm,
    "temporal-worker-sigkill": temporal_worker_sigkill,
    "temporal-server-sigkill": temporal_server_sigkill,
    "poison-job": poison_job,
    "joblog-db-blink": joblog_db_blink,
}


def picks(kinds: list[str], seed: int) -> Iterator[str]:
    """Rounds of every kind once, each round in its own seeded shuffle."""
    rng = random.Random(seed)
    while True:
        round_ = list(kinds)
        rng.shuffle(round_)
        yield from round_

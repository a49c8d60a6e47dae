"""`make chaos` row: the Temporal server SIGKILLed every few seconds under load, restarted on its
database each time; a step whose function returned must never run again (issue 29, item 2).

The shared dev server of the suite (tests/support.TemporalDevServer) is owned by temporalio's
test environment and has no database file; this row runs its own `temporal server start-dev
--db-filename`, which it may SIGKILL and start again on the same file and port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.faults.ledger import Ledger
from tests.faults.scenarios import Harness, Load, Row, _timed, finish, say, wait_final
from tests.support import free_port, temporal_cli, wait_for


class CrashableTemporal:
    """A Temporal dev server persisted in an SQLite file: SIGKILL it, start it again on the same
    file and port, and it comes back with every workflow it had accepted."""

    def __init__(self, db_file: Path | None = None) -> None:
        self.port = free_port()
        self.db_file = db_file or Path(tempfile.mkdtemp(prefix="jobyard-temporal-")) / "t.db"
        self.log = self.db_file.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> CrashableTemporal:
        args = [
            temporal_cli(), "server", "start-dev", "--headless", "--ip", "127.0.0.1",
            "--port", str(self.port), "--http-port", str(free_port()),
            "--metrics-port", str(free_port()), "--db-filename", str(self.db_file),
            "--log-level", "error", "--namespace", "default",
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(self._serving, timeout=timeout, interval=0.1)
        return self

    def _serving(self) -> bool:
        """The frontend answers a health check (the port alone opens before it serves)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"temporal exited:\n{self.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            health = subprocess.run(
                [temporal_cli(), "operator", "cluster", "health", "--address", self.address],
                capture_output=True, text=True, timeout=10, check=False,
            )  # fmt: skip
            return "SERVING" in health.stdout
        return False

    def sigkill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.kills += 1

    def restart(self) -> None:
        self.sigkill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.sigkill()

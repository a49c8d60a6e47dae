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
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


#: The Temporal worker's FaultLog lines for steps answered from the journal (activities.py).
_HIT = "step returned before, not run again"
_HITS_MORE = re.compile(re.escape(_HIT) + r": (\d+) more in the last")


def journal_hits(log: str) -> int:
    """Steps a worker answered from the step journal instead of running them, by its log."""
    return log.count(f"{_HIT}: job ") + sum(int(m) for m in _HITS_MORE.findall(log))


#: Seconds this row's accepted jobs get to finish after the last restart, at least.
SETTLE_SECONDS = 120.0


@_timed
def temporal_server_crashes(
    h: Harness,
    n: int = 300,
    rate: float = 10.0,
    every: float = 4.0,
    down: float = 1.0,
    last_down: float = 11.0,
    work: float = 1.0,
    workers: int = 2,
) -> Row:
    """Jobs of three steps dispatched to Temporal (USE_DRAMATIQ=false) at `rate` per second,
    while the Temporal server is SIGKILLed every `every` seconds and started again on its
    database `down` seconds later; every fourth kill, and the last, keeps it down `last_down`
    seconds, past the workers' retries of a step's completion, so steps that returned meanwhile
    are certainly unknown to Temporal. A dispatch refused as not started is dispatched again,
    as its caller is told to; that the refused one never ran is checked in the ledger by its
    job id."""
    ledger = h.ledger("temporal-crash")
    server = CrashableTemporal(h.workdir / f"temporal-{time.monotonic_ns()}.db").start()
    cluster = dataclasses.replace(h, temporal_address=server.address).cluster(aof=True)
    try:
        procs = [cluster.start_temporal_worker(wait=False) for _ in range(workers)]
        for proc in procs:
            cluster.wait_ready(proc)
        cluster.apply({"USE_DRAMATIQ": "false"})
        say(f"{workers} temporal workers up")
        load = Load(ledger, steps=3, work=work)
        feeder = threading.Thread(target=_feed, args=(load, n, rate), daemon=True)
        feeder.start()
        downtimes: list[tuple[float, float]] = []
        while feeder.is_alive():
            feeder.join(every)
            if feeder.is_alive():  # every fourth kill a long one
                downtimes.append(_crash(server, last_down if len(downtimes) % 4 == 3 else down))
        downtimes.append(_crash(server, last_down))
        say(f"temporal server SIGKILLed {server.kills} times")
        # Jobs whose step was cut by the last, long kill wait for its heartbeat timeout; a dev
        # server just SIGKILLed many times takes its time firing those (its timer queue).
        final = wait_final(load.accepted(), max(h.settle, SETTLE_SECONDS))
        row = finish("temporal server SIGKILLed under load", load, final)
        returned = [
            e.ended
            for steps in ledger.histories().values()
            for history in steps.values()
            for e in history.executions
            if e.ended is not None and not e.failed
        ]
        long_downs = [(a, b) for a, b in downtimes if b - a >= last_down]
        returned_while_down = sum(1 for t in returned if any(a <= t <= b for a, b in downtimes))
        returned_in_long = sum(1 for t in returned if any(a <= t <= b for a, b in long_downs))
        ran = {line["job"] for line in ledger.lines()}
        refused = [a for a in load.attempts if a.error == "DispatchUnavailableError"]
        row.extra["kills"] = server.kills
        row.extra["refused"] = len(refused)
        row.extra["unknown"] = sum(
            1 for a in load.attempts if a.error == "DispatchOutcomeUnknownError"
        )
        row.extra["refused_but_ran"] = sum(
            1 for a in refused if a.job_id is None or a.job_id in ran
        )
        row.extra["returned_while_down"] = returned_while_down
        row.extra["of_them_in_long_downs"] = returned_in_long
        logs = [p.output() for p in procs]
        row.extra["journal_hits"] = sum(journal_hits(log) for log in logs)
        row.extra["worker_log_lines"] = "/".join(str(len(log.splitlines())) for log in logs)
        row.extra["tracebacks"] = sum(log.count("Traceback") for log in logs)
        row.require(server.kills >= 3, "the server was SIGKILLed at least three times")
        row.require(returned_while_down > 0, "steps returned while the server was down")
        row.require(row.extra["tracebacks"] == 0, "rule 4: expected faults log no traceback")
        row.require(
            row.extra["refused_but_ran"] == 0,
            "rule 4: a dispatch refused as not started (its id known) never runs",
        )
        return row
    finally:
        cluster.close()
        server.stop()


def _feed(load: Load, n: int, rate: float) -> None:
    """`n` jobs, one every 1/`rate` s (no catching up in a burst after a slow stretch); a job
    refused as not started is dispatched again 0.2 s later, under a new id."""
    for i in range(n):
        began = time.monotonic()
        while load.dispatch(f"j{i}").error == "DispatchUnavailableError":
            time.sleep(0.2)
        time.sleep(max(0.0, began + 1 / rate - time.monotonic()))


def _crash(server: CrashableTemporal, down: float) -> tuple[float, float]:
    """SIGKILL the server, start it again `down` seconds later; (killed, back) in unix seconds."""
    server.sigkill()
    killed = time.time()
    time.sleep(down)
    server.start()
    return killed, time.time()


#: The rows of this module, for `make chaos` (tests/faults/run.py).
FULL: list[tuple[Callable[..., Row], dict[str, Any]]] = [
    (temporal_server_crashes, {"n": 100}),
]

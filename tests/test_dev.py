"""`jobyard dev` notices a child that died: it restarts it, or stops and says which and why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobyard.dispatcher import dispatch_job, get_job
from tests.support import wait_for

pytestmark = pytest.mark.timeout(240)


def children_of(pid: int) -> dict[int, str]:
    """{pid: command line} of a process's direct children, from /proc."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            found[int(child)] = cmdline.decode(errors="replace")
    return found


def temporal_workers(pid: int) -> list[int]:
    return [child for child, cmd in children_of(pid).items() if "temporal-worker" in cmd]


def start_dev(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "dev.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobyard.cli", "dev", "--no-canary", "--api-port", "0"],
            env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return proc, log


def stop_dev(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def test_a_dead_child_is_restarted(
    jobyard_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, log = start_dev(tmp_path, dict(os.environ))
    try:

        def running() -> bool:
            assert proc.poll() is None, log.read_text()
            return "running; Ctrl-C to stop" in log.read_text()

        wait_for(running, timeout=120)
        (temporal_worker,) = [
            p for p, cmd in children_of(proc.pid).items() if "temporal-worker" in cmd
        ]
        os.kill(temporal_worker, signal.SIGKILL)
        wait_for(
            lambda: (
                "temporal-worker exited (killed by SIGKILL); restarting it (1/3)" in log.read_text()
            ),
            timeout=30,
        )
        (restarted,) = wait_for(lambda: temporal_workers(proc.pid), timeout=30)
        assert restarted != temporal_worker
        # The new Temporal worker runs jobs.
        monkeypatch.setenv("USE_DRAMATIQ", "false")
        handle = dispatch_job("system.echo", {"after": "restart"})
        assert handle.engine == "temporal"
        status = wait_for(
            lambda: (s := get_job(handle.job_id)).state == "succeeded" and s, timeout=90
        )
        assert status.result == {"after": "restart"}
    finally:
        code = stop_dev(proc)
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_a_child_that_keeps_dying_stops_dev_saying_which(
    jobyard_env: dict[str, str], tmp_path: Path
) -> None:
    # A worker that refuses to start: it exits 2 at once, every time.
    proc, log = start_dev(tmp_path, {**os.environ, "WORKER_PROCESSES": "0"})
    try:
        code = proc.wait(180)
    except subprocess.TimeoutExpired:
        stop_dev(proc)
        raise
    output = log.read_text()
    assert code == 1, output
    assert "worker exited (exit code 2); restarting it (3/3)" in output
    assert "worker exited (exit code 2) 4 times within 60 s; stopping" in output
    with pytest.raises(ProcessLookupError):  # nothing of dev's is left running
        os.killpg(proc.pid, 0)

"""The Dramatiq internals jobyard overrides or uses (jobyard.queue.dramatiq_compat) are those of
the installed Dramatiq: names, signatures, the calls that reach the overrides, dispatch.lua's
ARGV. And the check does fail on a Dramatiq that differs: a copy of the installed one, doctored,
first on the import path of a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dramatiq

from jobyard.queue.dramatiq_compat import check_installed_dramatiq


def test_installed_dramatiq_is_what_the_fence_was_written_for() -> None:
    assert check_installed_dramatiq() == []


def _copy_of_dramatiq(tmp_path: Path) -> Path:
    source = Path(dramatiq.__file__).parent
    shutil.copytree(source, tmp_path / "dramatiq", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "dramatiq"


def _check_with(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "jobyard.queue.dramatiq_compat"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer has {old!r}: update the doctoring"
    path.write_text(text.replace(old, new))


def test_an_undoctored_copy_passes(tmp_path: Path) -> None:
    copy = _copy_of_dramatiq(tmp_path)
    checked = _check_with(tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert str(copy) in checked.stdout  # the copy was the Dramatiq checked


def test_a_doctored_dramatiq_fails_the_check(tmp_path: Path) -> None:
    copy = _copy_of_dramatiq(tmp_path)
    # A renamed private method: JobyardWorker's override would never be called.
    _edit(copy / "worker.py", "def _add_consumer(", "def _add_queue_consumer(")
    _edit(copy / "worker.py", "self.worker._add_consumer(", "self.worker._add_queue_consumer(")
    # A new parameter on an overridden method.
    _edit(
        copy / "worker.py",
        "    def handle_delayed_messages(self) -> None:",
        "    def handle_delayed_messages(self, limit: int = 0) -> None:",
    )
    # dispatch.lua's ARGV reordered: the dead-worker sweep would pass the wrong values.
    _edit(
        copy / "brokers" / "redis" / "dispatch.lua",
        "local heartbeat_timeout = ARGV[5]\nlocal dead_message_ttl = ARGV[6]",
        "local dead_message_ttl = ARGV[5]\nlocal heartbeat_timeout = ARGV[6]",
    )
    checked = _check_with(tmp_path)
    print(checked.stdout)  # the report (pytest -s) shows what the check says
    assert checked.returncode == 1, checked.stdout + checked.stderr
    out = checked.stdout
    assert "dramatiq.worker.Worker._add_consumer: missing" in out
    assert "after_declare_queue: no longer has `self.worker._add_consumer(queue_name)`" in out
    assert "ConsumerThread.handle_delayed_messages(self, limit: 'int' = 0) -> 'None'" in out
    assert "dispatch.lua ARGV:" in out
    assert str(copy) in out

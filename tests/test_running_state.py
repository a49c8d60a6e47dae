"""A run shows as running while it runs, also when it has no steps (a no-step job's only Redis
write is otherwise its `complete` call, at the end): the worker marks runs older than
SHOW_RUNNING_AFTER at its next heartbeat, without counting an attempt."""

from __future__ import annotations

import time
from pathlib import Path

from jobyard.dispatcher import get_job
from jobyard.dispatcher.events import read_events
from jobyard.job_engine.db.joblog import writer
from tests.engines import Engines
from tests.support import wait_for


def states_logged(job_id: str) -> list[str]:
    return [e.state for e in read_events(job_id, 0) if e.kind == "state" and e.state]


def test_a_long_job_without_steps_shows_running_while_it_runs(
    engines: Engines, tmp_path: Path
) -> None:
    handle = engines.dispatch("dramatiq", "test.nap", {"marker_dir": str(tmp_path), "seconds": 4})
    dispatched = time.monotonic()
    wait_for(lambda: get_job(handle.job_id).state == "running", timeout=4)
    shown_after = time.monotonic() - dispatched
    assert get_job(handle.job_id).attempts == 0  # counted when the run ends, as without the mark
    wait_for(lambda: states_logged(handle.job_id)[-1:] == ["running"], timeout=4)

    done = engines.wait(handle.job_id)
    assert done.state == "succeeded" and done.result == 1, done
    assert done.attempts == 1, done  # the mark counted no attempt
    assert (tmp_path / "nap").read_text().splitlines() == ["ran"]  # one execution
    wait_for(lambda: states_logged(handle.job_id)[-1:] == ["succeeded"], timeout=10)
    assert states_logged(handle.job_id) == ["queued", "running", "succeeded"]
    events = [e for e in read_events(handle.job_id, 0) if e.state == "running"]
    assert [e.attempts for e in events] == [1]
    print(f"shown running {shown_after:.2f}s after dispatch")


def test_a_short_job_is_written_once_when_it_ends(engines: Engines, tmp_path: Path) -> None:
    """Runs shorter than SHOW_RUNNING_AFTER cost no extra write or event."""
    handle = engines.dispatch("dramatiq", "test.nap", {"marker_dir": str(tmp_path), "seconds": 0.0})
    assert engines.wait(handle.job_id).state == "succeeded"
    time.sleep(1.5)  # heartbeats pass (0.5 s apart here): none marks a finished run
    log = writer()
    if log is not None:
        log.flush()
    wait_for(lambda: states_logged(handle.job_id)[-1:] == ["succeeded"], timeout=10)
    # ("queued", from this process's job log writer, may arrive after the worker's "succeeded"
    # and is then not an event of its own: events are numbered as they reach the job log)
    assert "running" not in states_logged(handle.job_id)
    assert get_job(handle.job_id).state == "succeeded"

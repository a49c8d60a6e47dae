"""Flow control on Temporal (docs/flow-control.md), with a real `jobyard temporal-worker` on the
session's dev server and USE_DRAMATIQ=false: each jobyard queue's steps on a task queue of their
own, at most the queue's concurrency at once per worker process, one queue never waiting for
another's slots; `jobyard temporal-worker --queues` runs only those queues' steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobyard.cli.main import main as cli_main
from tests.engines import Engines
from tests.flow_temporal_jobs import NARROW_CONCURRENCY
from tests.support import Proc, wait_for

JOB_MODULES = "tests.jobs,tests.flow_temporal_jobs"


@pytest.fixture
def flow_env(jobyard_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("JOBYARD_JOB_MODULES", JOB_MODULES)
    return {**jobyard_env, "JOBYARD_JOB_MODULES": JOB_MODULES}


def spans(directory: Path) -> list[tuple[str, float, float, int]]:
    """(label, start, end, pid) of every finished step, in the order they finished."""
    path = directory / "spans"
    if not path.exists():
        return []
    return [
        (label, float(start), float(end), int(pid))
        for label, start, end, pid in (line.split() for line in path.read_text().splitlines())
    ]


def most_at_once(runs: list[tuple[str, float, float, int]]) -> int:
    edges = sorted([(start, 1) for _, start, _, _ in runs] + [(end, -1) for _, _, end, _ in runs])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def start_temporal_worker(engines: Engines, *args: str) -> Proc:
    proc = Proc(["temporal-worker", *args], dict(os.environ))
    engines._procs.append(proc)  # stopped with the fixture's
    engines.temporal_worker = engines.temporal_worker or proc

    def polling() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"temporal worker exited:\n{proc.output()}")
        return "Temporal worker polling" in proc.output()

    wait_for(polling, timeout=120)
    return proc


def test_a_queue_runs_at_most_its_concurrency_of_steps_and_blocks_no_other_queue(
    flow_env: dict[str, str], engines: Engines, tmp_path: Path
) -> None:
    """6 steps of 1.5 s on `tq-narrow` (concurrency 2) take three turns of 2; a step of
    `tq-wide`, dispatched after them, runs during the first turn, not after the backlog."""
    engines.ensure_temporal_worker()
    narrow = [
        engines.dispatch(
            "temporal", "tq.narrow", {"marker_dir": str(tmp_path), "label": f"n{i}", "seconds": 1.5}
        )
        for i in range(3 * NARROW_CONCURRENCY)
    ]
    wide = engines.dispatch(
        "temporal", "tq.wide", {"marker_dir": str(tmp_path), "label": "w", "seconds": 0.1}
    )
    for handle in [*narrow, wide]:
        assert engines.wait(handle.job_id, timeout=120).state == "succeeded", engines.logs()
    runs = spans(tmp_path)
    narrow_runs = [run for run in runs if run[0].startswith("n")]
    (wide_run,) = [run for run in runs if run[0] == "w"]
    assert len(narrow_runs) == 3 * NARROW_CONCURRENCY
    assert most_at_once(narrow_runs) == NARROW_CONCURRENCY, narrow_runs
    last_narrow_start = max(start for _, start, _, _ in narrow_runs)
    assert wide_run[2] < last_narrow_start, (wide_run, narrow_runs)


def test_a_temporal_worker_told_its_queues_runs_only_their_steps(
    flow_env: dict[str, str], engines: Engines, tmp_path: Path
) -> None:
    """`--queues tq-wide`: the workflows of every job run, the steps of tq-wide only; a
    tq-narrow step waits on its task queue until a worker for tq-narrow polls it."""
    start_temporal_worker(engines, "--queues", "tq-wide")
    narrow = engines.dispatch(
        "temporal", "tq.narrow", {"marker_dir": str(tmp_path), "label": "n", "seconds": 0}
    )
    wide = engines.dispatch(
        "temporal", "tq.wide", {"marker_dir": str(tmp_path), "label": "w", "seconds": 0}
    )
    assert engines.wait(wide.job_id, timeout=90).state == "succeeded"
    assert engines.wait(narrow.job_id, timeout=3, states=("running",)).state == "running"
    assert [label for label, *_ in spans(tmp_path)] == ["w"]
    start_temporal_worker(engines, "--queues", "tq-narrow")
    assert engines.wait(narrow.job_id, timeout=90).state == "succeeded"
    assert sorted(label for label, *_ in spans(tmp_path)) == ["n", "w"]


def test_a_temporal_worker_told_an_unknown_queue_says_so(
    flow_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["temporal-worker", "--queues", "tq-wide,nope"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unknown queue 'nope'" in err and "tq-wide" in err, err

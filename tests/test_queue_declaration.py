"""Queues an app declares (`jobyard.job_engine.queue`): run by a real `jobyard worker`, refused
with a clear error when named but not declared, declared twice differently, or given bad values."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from jobyard.dispatcher import dispatch_job
from jobyard.job_engine import (
    JobContext,
    QueueError,
    RateLimit,
    UnknownQueueError,
    get_spec,
    job,
    queue,
    queues,
)
from jobyard.job_engine.queues import get_queue, parse_queue_list, queue_names
from tests.engines import Engines
from tests.queue_jobs import AI_CONCURRENCY
from tests.support import ROOT, Proc, most_at_once

QUEUE_JOB_MODULES = "tests.jobs,tests.queue_jobs"


class Empty(BaseModel):
    pass


@pytest.fixture
def restored_queues(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's queue registry as it was: the queues a test declares go with it."""
    monkeypatch.setattr(queues, "_QUEUES", dict(queues._QUEUES))
    yield


@pytest.fixture
def ai_env(jobyard_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("JOBYARD_JOB_MODULES", QUEUE_JOB_MODULES)
    return {**jobyard_env, "JOBYARD_JOB_MODULES": QUEUE_JOB_MODULES}


def spans(directory: Path) -> list[tuple[float, float, int]]:
    path = directory / "spans"
    if not path.exists():
        return []
    return [
        (float(start), float(end), int(pid))
        for start, end, pid in (line.split() for line in path.read_text().splitlines())
    ]


def test_a_declared_queue_runs_on_a_worker_told_to_run_it(
    ai_env: dict[str, str], engines: Engines, tmp_path: Path
) -> None:
    """`jobyard worker --queues ai` runs the `ai` queue a job module declared, at its declared
    concurrency, and no other queue."""
    worker = engines.start_worker(queues="ai")
    assert engines.live_workers("ai") == 1
    assert [engines.live_workers(q) for q in ("default", "data-sync", "scheduled")] == [0, 0, 0]
    handles = [
        dispatch_job("test.ai_span", {"marker_dir": str(tmp_path), "seconds": 1.0})
        for _ in range(3 * AI_CONCURRENCY)
    ]
    assert {h.engine for h in handles} == {"dramatiq"}, handles
    for handle in handles:
        status = engines.wait(handle.job_id, timeout=90)
        assert status.state == "succeeded", (status, worker.output()[-3000:])
    runs = spans(tmp_path)
    assert len(runs) == 3 * AI_CONCURRENCY
    assert most_at_once(runs) == AI_CONCURRENCY, runs
    # A job of a queue nobody runs goes to Temporal: the worker took no other queue.
    assert dispatch_job("system.echo", {"message": "x"}).fallback_reason == "no_live_workers"


def test_a_worker_told_no_queue_runs_every_declared_one(
    ai_env: dict[str, str], engines: Engines
) -> None:
    proc = Proc(["worker", "--processes", "1"], dict(os.environ))
    engines._procs.append(proc)  # stopped with the fixture's
    engines.wait_for_workers(["default", "data-sync", "scheduled", "ai"], proc)


def test_a_worker_told_an_unknown_queue_says_so() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JOBYARD_JOB_MODULES": QUEUE_JOB_MODULES}
    done = subprocess.run(
        [sys.executable, "-m", "jobyard.cli", "worker", "--queues", "ai,nope"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2, done
    assert "unknown queue 'nope'" in done.stderr and "ai" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "modules",
    ["tests.queue_jobs,tests.queue_jobs_early", "tests.queue_jobs_early,tests.queue_jobs"],
)
def test_a_queue_may_be_declared_by_any_job_module(modules: str) -> None:
    """In the module of its jobs, above them, or in another job module listed before or after
    it: `@job` loads the job modules before it calls a queue unknown."""
    code = (
        "from jobyard.job_engine import get_spec\n"
        "from jobyard.job_engine.queues import queue_names\n"
        "print(get_spec('test.ai_early').queue, get_spec('test.ai_span').queue, queue_names())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JOBYARD_JOB_MODULES": modules}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ai ai ['default', 'data-sync', 'scheduled', 'ai']"


def test_a_job_on_an_undeclared_queue_fails_at_declaration(restored_queues: None) -> None:
    name = f"test.nowhere_{uuid.uuid4().hex[:8]}"
    with pytest.raises(UnknownQueueError, match="unknown queue 'nowhere'") as caught:
        job(name, queue="nowhere", payload=Empty)
    assert "declare it with jobyard.job_engine.queue('nowhere', ...)" in str(caught.value)
    assert isinstance(caught.value, ValueError)  # what callers of get_queue caught before
    with pytest.raises(LookupError):
        get_spec(name)  # nothing was declared


def test_a_job_on_a_queue_declared_above_it_is_accepted(restored_queues: None) -> None:
    queue("reports", concurrency=2, time_limit=30)
    name = f"test.report_{uuid.uuid4().hex[:8]}"

    @job(name, queue="reports", payload=Empty)
    async def report(ctx: JobContext, payload: Empty) -> None:
        return None

    assert get_spec(name).queue == "reports"
    assert "reports" in queue_names() and parse_queue_list("reports") == ["reports"]


def test_declaring_a_queue_again_differently_is_an_error(restored_queues: None) -> None:
    first = queue("webhooks", concurrency=10, rate_limit=RateLimit(5, 1.0))
    assert queue("webhooks", concurrency=10, rate_limit=RateLimit(5, 1.0)) is first  # the same
    with pytest.raises(QueueError, match="'webhooks' is declared twice with different settings"):
        queue("webhooks", concurrency=11, rate_limit=RateLimit(5, 1.0))
    with pytest.raises(QueueError, match="declared twice"):
        queue("webhooks", concurrency=10)  # the rate limit left out is a difference too
    with pytest.raises(QueueError, match="declared twice"):
        queue("default", concurrency=3)  # the built-in queues too
    queue("web-hooks")
    with pytest.raises(QueueError, match="'web_hooks' and queue 'web-hooks' would share the env"):
        queue("web_hooks")  # both WORKER_CONCURRENCY_WEB_HOOKS
    assert get_queue("webhooks").concurrency == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency": 0}, "concurrency=0 must be a whole number of at least 1"),
        ({"concurrency": 2.5}, "concurrency=2.5 must be a whole number"),
        ({"concurrency": True}, "concurrency=True must be a whole number"),
        ({"max_attempts": 0}, "max_attempts=0 must be a whole number"),
        ({"prefetch_factor": -1}, "prefetch_factor=-1 must be a whole number"),
        ({"time_limit": 0}, "time_limit=0 must be a positive number of seconds"),
        ({"time_limit": -5.0}, "time_limit=-5.0 must be a positive number"),
        ({"time_limit": "60"}, "time_limit='60' must be a positive number"),
        ({"rate_limit": (60, 60)}, "rate_limit=(60, 60) must be a jobyard.job_engine.RateLimit"),
    ],
)
def test_bad_queue_settings_are_refused(
    restored_queues: None, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(QueueError, match=re.escape(f"queue 'bad': {message}")):
        queue("bad", **kwargs)  # type: ignore[arg-type]
    assert "bad" not in queue_names()


@pytest.mark.parametrize("name", ["", "AI", "a.i", "a i", "-ai", "x" * 64, 3])
def test_bad_queue_names_are_refused(restored_queues: None, name: object) -> None:
    with pytest.raises(QueueError, match="invalid queue name"):
        queue(name)  # type: ignore[arg-type]


def test_bad_rate_limits_are_refused() -> None:
    with pytest.raises(ValueError, match=r"RateLimit\.calls must be a whole number of at least 1"):
        RateLimit(0, 60.0)
    with pytest.raises(ValueError, match=r"RateLimit\.period must be a positive number"):
        RateLimit(10, 0)


def test_env_overrides_apply_to_a_declared_queue(
    restored_queues: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue("documents", concurrency=2, time_limit=600, rate_limit=RateLimit(10, 1.0))
    monkeypatch.setenv("WORKER_CONCURRENCY_DOCUMENTS", "5")
    monkeypatch.setenv("QUEUE_TIME_LIMIT_DOCUMENTS", "30")
    monkeypatch.setenv("QUEUE_MAX_ATTEMPTS_DOCUMENTS", "2")
    config = get_queue("documents")
    assert (config.concurrency, config.time_limit, config.max_attempts) == (5, 30.0, 2)
    assert config.rate_limit == RateLimit(10, 1.0)
    monkeypatch.setenv("WORKER_CONCURRENCY_DOCUMENTS", "0")
    with pytest.raises(QueueError, match=r"concurrency=0 \(from WORKER_CONCURRENCY_DOCUMENTS\)"):
        get_queue("documents")


def test_a_job_module_naming_an_undeclared_queue_fails_to_import(tmp_path: Path) -> None:
    """The error is the module's, at import: a worker or web app loading it does not start."""
    module = f"typo_jobs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from pydantic import BaseModel\n"
        "from jobyard.job_engine import job, queue\n"
        "queue('ai', concurrency=3)\n"
        "class P(BaseModel):\n    pass\n"
        "@job('typo.job', queue='a1', payload=P)\n"
        "async def run(ctx, payload): ...\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "JOBYARD_JOB_MODULES": module}
    done = subprocess.run(
        [sys.executable, "-c", "from jobyard.job_engine import registry; registry.names()"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "UnknownQueueError: unknown queue 'a1' (queues: default, data-sync, scheduled, ai)" in (
        done.stderr
    ), done.stderr


def test_most_at_once_counts_overlapping_runs() -> None:
    """The measure of the concurrency test, on spans made up for it."""
    assert most_at_once([(0, 1, 1), (1, 2, 1)]) == 1
    assert most_at_once([(0, 2, 1), (1, 3, 1), (1.5, 4, 1), (3.5, 5, 1)]) == 3

"""The ctx contract, enforced: the same handlers (tests/conformance_jobs.py) run on the inline
engine, on Dramatiq (a real `jobyard worker`) and on Temporal (a real `jobyard temporal-worker`),
and each engine must show the same behaviour. A new engine is one more entry in ENGINES.

The workers are started once for the module (their start-up is most of the cost); every test has
its own marker directory and job ids.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

import tests.conformance_jobs  # noqa: F401 - declares the jobs in this process, for inline
from jobyard.dispatcher import cancel_job, get_job, reset_dispatcher
from jobyard.job_engine import PermanentError, get_spec
from jobyard.job_engine.db.joblog import reset_writer
from jobyard.job_engine.inline import InlineContext
from jobyard.queue.client import reset_clients
from tests.conftest import WEBHOOK_SECRET
from tests.engines import Engines
from tests.support import ROOT, RedisServer, TemporalDevServer, wait_for

ENGINES = ["inline", "dramatiq", "temporal"]

#: (test, engine) pairs where an engine breaks the contract today, each with where the fix goes.
#: Strict: once fixed, the test passes, fails as XPASS, and the entry must go.
#: (test, engine) pairs where an engine is known to break the contract: strict xfails naming
#: the fix, so the suite turns red the day the gap closes without this entry being removed.
KNOWN_GAPS: dict[tuple[str, str], str] = {}


@dataclass
class Outcome:
    state: str
    result: Any = None
    attempts: int = 0
    error: str = ""


class Job(Protocol):
    job_id: str

    def progress(self) -> Any: ...

    def cancel(self) -> None: ...

    def wait(self, timeout: float = 30) -> Outcome: ...


class InlineJob:
    """A job on the inline engine, on a thread and loop of its own so a test can watch it."""

    def __init__(self, name: str, payload: dict[str, Any]) -> None:
        spec = get_spec(name)
        self.job_id = uuid.uuid4().hex
        self.ctx = InlineContext(spec, self.job_id, self._progressed)
        self._progress: Any = None
        self._outcome: Outcome | None = None
        self._done = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self.ctx.execute(spec.validate(payload)))
        threading.Thread(target=self._main, daemon=True).start()

    def _progressed(self, value: Any) -> None:
        self._progress = value

    def _main(self) -> None:
        ctx = self.ctx
        try:
            result = self._loop.run_until_complete(self._task)
            self._outcome = Outcome("succeeded", result, ctx.attempt)
        except asyncio.CancelledError:
            self._outcome = Outcome("cancelled", None, ctx.attempt)
        except PermanentError as exc:
            self._outcome = Outcome("failed", None, ctx.attempt, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # its retries ran out, or its time did
            self._outcome = Outcome("dead", None, ctx.attempt, f"{type(exc).__name__}: {exc}")
        finally:
            self._done.set()
            self._loop.close()  # does not wait for a step thread that outlived a timeout

    def progress(self) -> Any:
        return self._progress

    def cancel(self) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)

    def wait(self, timeout: float = 30) -> Outcome:
        assert self._done.wait(timeout), f"inline job {self.job_id} still running after {timeout}s"
        assert self._outcome is not None
        return self._outcome


class EngineJob:
    """A job dispatched to a real engine, watched through the dispatcher's public functions."""

    def __init__(self, engines: Engines, engine: str, name: str, payload: dict[str, Any]) -> None:
        self.engines = engines
        self.job_id = engines.dispatch(engine, name, payload).job_id

    def progress(self) -> Any:
        return get_job(self.job_id).progress

    def cancel(self) -> None:
        cancel_job(self.job_id)

    def wait(self, timeout: float = 30) -> Outcome:
        status = self.engines.wait(self.job_id, timeout=timeout)
        return Outcome(status.state, status.result, status.attempts, status.error or "")


@pytest.fixture(scope="module")
def real_engines(temporal_server: TemporalDevServer, job_log_database: str) -> Iterator[Engines]:
    """One private Redis, one `jobyard worker` and one `jobyard temporal-worker` for the module
    (the jobyard_env fixture's settings, at module scope)."""
    redis_server = RedisServer().start()
    values = {
        "REDIS_URL": redis_server.url,
        "TEMPORAL_ADDRESS": temporal_server.address,
        "TEMPORAL_TASK_QUEUE": f"conformance-{uuid.uuid4().hex[:12]}",
        "USE_DRAMATIQ": "true",
        "WORKER_HEARTBEAT_INTERVAL": "0.5",
        "WORKER_HEARTBEAT_TIMEOUT": "3",
        "WORKER_SHUTDOWN_GRACE": "5",
        "WORKER_CONCURRENCY_DEFAULT": "4",
        "JOBYARD_JOB_MODULES": "tests.jobs,tests.conformance_jobs",
        "JOBYARD_BREAKER_PROBE_INTERVAL": "0.2",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": job_log_database,
        "JOBYARD_JOB_LOG_INTERVAL": "0.1",
        "WORKER_METRICS_PORT": "0",
        "TEMPORAL_WORKER_METRICS_PORT": "0",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        reset_dispatcher()
        reset_clients()
        reset_writer()
        engines = Engines(redis_server)
        try:
            # Both workers start at once: their start-up is most of this module's time.
            dramatiq_worker = threading.Thread(target=engines.start_worker)
            dramatiq_worker.start()
            engines.start_temporal_worker()
            dramatiq_worker.join()
            assert engines.worker is not None, "the Dramatiq worker did not start"
            yield engines
        finally:
            engines.close()
            reset_dispatcher()
            reset_clients()
            reset_writer()
            redis_server.stop()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def start(request: pytest.FixtureRequest, engine: str, tmp_path: Path) -> Callable[..., Job]:
    """`start(job_name, **payload)` on the engine under test; marker_dir is the test's tmp_path."""
    gap = KNOWN_GAPS.get((request.function.__name__, engine))
    if gap is not None:
        request.applymarker(pytest.mark.xfail(reason=gap, strict=True))
    if engine == "inline":
        return lambda name, **extra: InlineJob(name, {"marker_dir": str(tmp_path), **extra})
    engines: Engines = request.getfixturevalue("real_engines")
    return lambda name, **extra: EngineJob(
        engines, engine, name, {"marker_dir": str(tmp_path), **extra}
    )


def runs(directory: Path) -> dict[str, int]:
    """How many times each step ran: one line per execution in a file named after it."""
    return {
        path.name: len(path.read_text().splitlines())
        for path in directory.iterdir()
        if path.name != "go"
    }


def test_step_results_finished_steps_and_attempts(start, tmp_path):
    """`flaky` fails once: the retry runs it again, never `first`, and attempt counts the try."""
    job = start("conformance.steps")
    outcome = job.wait()
    assert outcome.state == "succeeded", outcome
    assert outcome.result == {
        "first": 1,
        "flaky": 2,
        "pair": [1, {"n": 2}],  # a tuple comes back as its JSON form
        "attempt": 2,
        "job_id": job.job_id,
        "job_name": "conformance.steps",
        "key": f"{job.job_id}:flaky",
    }
    assert outcome.attempts == 2
    assert runs(tmp_path) == {"first": 1, "flaky": 2, "pair": 1}


def test_durable_sleep_resumes_past_finished_steps(start, tmp_path):
    began = time.monotonic()
    outcome = start("conformance.sleep", seconds=1.5).wait()
    assert time.monotonic() - began >= 1.5
    assert outcome.state == "succeeded", outcome
    assert outcome.result == {"before": 1, "after": 1, "attempt": 1}  # a sleep is no attempt
    assert outcome.attempts == 1
    assert runs(tmp_path) == {"before": 1, "after": 1}


def test_progress_is_visible_while_running(start, tmp_path):
    job = start("conformance.progress")
    wait_for(lambda: job.progress() == {"done": 1, "of": 2}, timeout=15)
    (tmp_path / "go").touch()
    outcome = job.wait()
    assert (outcome.state, outcome.result) == ("succeeded", "done"), outcome
    assert job.progress() == 1.0  # the last report stays once the job ended


def test_permanent_error_fails_without_retry(start, tmp_path):
    outcome = start("conformance.permanent").wait()
    assert (outcome.state, outcome.attempts) == ("failed", 1), outcome
    assert "the card was declined" in outcome.error
    assert runs(tmp_path) == {"first": 1, "refuse": 1}


def test_timeout_ends_the_job(start, tmp_path):
    """The job's timeout is 1 s and its one attempt's step would take 10 s."""
    began = time.monotonic()
    outcome = start("conformance.timeout").wait()
    assert time.monotonic() - began < 9, (outcome, runs(tmp_path))
    assert (outcome.state, outcome.attempts) == ("dead", 1), outcome
    assert runs(tmp_path) == {"tick": 1}


def test_cancel_stops_at_the_next_step(start, tmp_path):
    job = start("conformance.cancel")
    wait_for(lambda: runs(tmp_path).get("waiting") == 1, timeout=15)
    job.cancel()
    (tmp_path / "go").touch()  # lets the running step end; the next one must not start
    outcome = job.wait()
    assert outcome.state == "cancelled", outcome
    time.sleep(0.3)
    assert runs(tmp_path) == {"first": 1, "waiting": 1}


def test_step_name_used_twice_is_a_step_error(start, tmp_path):
    outcome = start("conformance.duplicate").wait()
    assert (outcome.state, outcome.attempts) == ("failed", 1), outcome
    assert "StepError" in outcome.error and "used twice" in outcome.error
    assert runs(tmp_path) == {"one": 1}


def test_step_function_must_be_module_level(start, tmp_path):
    outcome = start("conformance.closure").wait()
    assert (outcome.state, outcome.attempts) == ("failed", 1), outcome
    assert "StepError" in outcome.error and "module-level" in outcome.error
    assert runs(tmp_path) == {"first": 1}


def test_result_that_is_not_json_is_a_step_error(start, tmp_path):
    outcome = start("conformance.not_json").wait()
    assert (outcome.state, outcome.attempts) == ("failed", 1), outcome
    assert "StepError" in outcome.error and "JSON" in outcome.error
    assert runs(tmp_path) == {"a_set": 1}


def test_children_return_results_once_each(start, tmp_path):
    """Three children fanned out and one keyed child: results in order; every child ran once and
    the parent went past each fan-in once, although it ran again after `after` failed."""
    job = start("conformance.fan_out", count=3)
    outcome = job.wait(timeout=60)
    assert outcome.state == "succeeded", outcome
    assert outcome.result == {"results": [0, 10, 20], "single": 1000, "after": 2, "attempt": 2}
    assert runs(tmp_path) == {
        "before": 1, "child-0": 1, "child-1": 1, "child-2": 1, "resumed": 1, "child-100": 1,
        "after": 2,
    }  # fmt: skip
    if isinstance(job, EngineJob):  # the children are jobs of their own, under derived ids
        for child_id in (f"{job.job_id}:child1-0", f"{job.job_id}:child:one"):
            assert get_job(child_id).state == "succeeded"


def test_failed_child_raises_child_failed_error(start, tmp_path):
    job = start("conformance.child_fails")
    outcome = job.wait(timeout=60)
    assert outcome.state == "succeeded", outcome
    caught = outcome.result["caught"]
    assert caught["job_id"] == f"{job.job_id}:child1-0"
    assert caught["state"] == "failed"
    assert "child 1 refuses" in caught["error"]
    assert outcome.result["mixed"] == [20, "failed"]
    assert runs(tmp_path) == {"child-1": 1, "child-2": 1, "child-3": 1, "after": 1}


def test_uncaught_child_failure_fails_the_parent_once(start, tmp_path):
    job = start("conformance.child_fails_parent")
    outcome = job.wait(timeout=60)
    assert (outcome.state, outcome.attempts) == ("failed", 1), outcome
    assert "ChildFailedError" in outcome.error and f"{job.job_id}:child1-1" in outcome.error
    assert runs(tmp_path) == {"child-1": 1, "child-2": 1}


def test_too_many_children_are_refused_before_any_starts(start, tmp_path):
    outcome = start("conformance.too_many_children", count=10_001).wait(timeout=60)
    assert (outcome.state, outcome.attempts) == ("failed", 1), outcome
    assert "StepError" in outcome.error and "JOBYARD_MAX_CHILDREN allows 10000" in outcome.error
    assert runs(tmp_path) == {}


def test_an_invalid_child_payload_starts_no_child(start, tmp_path):
    outcome = start("conformance.bad_child").wait(timeout=60)
    assert (outcome.state, outcome.attempts) == ("failed", 1), outcome
    assert "StepError" in outcome.error and "child 1 (conformance.child)" in outcome.error
    assert runs(tmp_path) == {}

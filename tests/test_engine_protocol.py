"""Every engine behind `Engine` answers the same way: the same calls, the same typed results.

Runs the protocol's calls directly on each engine (inline in-process; Dramatiq with a real
`jobyard worker` on a private Redis; Temporal with a real `jobyard temporal-worker`), so a
fourth engine is done when it passes this file and the ctx conformance suite.
"""

from __future__ import annotations

import importlib
import inspect
import time
import uuid
from collections.abc import Iterator

import pytest

from jobyard.dispatcher import JobHandle, JobNotFoundError, get_dispatcher
from jobyard.dispatcher.engines import (
    CancelStatus,
    Engine,
    ReleaseStatus,
    ReplayStatus,
    RescueSource,
    Submission,
    SubmitStatus,
)
from jobyard.dispatcher.engines.inline import InlineEngine
from jobyard.job_engine import get_spec
from tests.engines import Engines

TERMINAL = ("succeeded", "failed", "dead", "cancelled")


@pytest.fixture(params=["inline", "dramatiq", "temporal"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if request.param == "inline":
        # In this process, so its jobs must be declared here (the others' workers load them
        # through JOBYARD_JOB_MODULES): alone, this test ran before anything imported them.
        importlib.import_module("tests.jobs")
        yield InlineEngine()
        return
    # The module's tests share their Redis and workers: each submits its own job ids.
    engines: Engines = request.getfixturevalue("shared_engines")
    if request.param == "dramatiq":
        engines.ensure_worker()
        yield get_dispatcher().dramatiq
    else:
        engines.ensure_temporal_worker()
        yield get_dispatcher().temporal


def submission(name: str, payload: dict, job_id: str | None = None) -> Submission:
    spec = get_spec(name)
    return Submission(job_id or uuid.uuid4().hex, spec.name, spec.queue, spec.encode(payload))


def wait_final(engine: Engine, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = engine.status(job_id)
        if found is not None and found.state in TERMINAL:
            return found.state
        time.sleep(0.1)
    raise AssertionError(f"{engine.name}: {job_id} not final after {timeout}s: {found}")


def test_submit_once_then_duplicate(engine: Engine) -> None:
    job = submission("system.echo", {"message": "hi"})
    assert engine.submit(job).status == SubmitStatus.STARTED
    again = engine.submit(job)
    assert again.status == SubmitStatus.DUPLICATE and again.owner == engine.name
    assert wait_final(engine, job.job_id) == "succeeded"
    found = engine.status(job.job_id)
    assert found is not None
    assert (found.engine, found.name, found.result) == (
        engine.name,
        "system.echo",
        {"message": "hi"},
    )


def test_unknown_job(engine: Engine) -> None:
    job_id = uuid.uuid4().hex
    assert engine.status(job_id) is None
    assert engine.cancel(job_id).status == CancelStatus.NOT_HERE
    assert engine.replay(job_id).status == ReplayStatus.NOT_HERE
    assert engine.steps(job_id) == {}
    assert engine.release(job_id, "system.echo", "default").status == ReleaseStatus.RELEASED


def test_finished_job_cannot_be_cancelled_released_or_replayed(engine: Engine) -> None:
    job = submission("system.echo", {"message": "done"})
    engine.submit(job)
    assert wait_final(engine, job.job_id) == "succeeded"
    assert engine.cancel(job.job_id).status == CancelStatus.FINISHED
    assert engine.release(job.job_id, job.name, job.queue).status == ReleaseStatus.KEPT
    assert engine.replay(job.job_id).status == ReplayStatus.ACTIVE


def test_failed_job_replays_under_its_id(engine: Engine, tmp_path) -> None:
    """test.fragile fails until a file exists; a replay after creating it succeeds."""
    job = submission("test.fragile", {"marker_dir": str(tmp_path)})
    engine.submit(job)
    assert wait_final(engine, job.job_id) in ("failed", "dead")
    (tmp_path / "fixed").write_text("yes")
    replayed = engine.replay(job.job_id)
    assert replayed.status == ReplayStatus.REPLAYED
    assert (replayed.name, replayed.payload) == ("test.fragile", job.payload)
    deadline = time.monotonic() + 60
    while (found := engine.status(job.job_id)) is None or found.state != "succeeded":
        assert time.monotonic() < deadline, found
        time.sleep(0.1)


def test_the_dispatcher_routes_through_any_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The dispatcher holds `Engine`s, not Dramatiq and Temporal: built on two inline engines,
    dispatch, dispatch_many and lookups go through the preferred one, as they go through
    Dramatiq in production."""
    from jobyard.dispatcher import Dispatcher
    from jobyard.dispatcher.breaker import CircuitBreaker
    from jobyard.job_engine.db.joblog import reset_writer

    importlib.import_module("tests.jobs")
    monkeypatch.setenv("JOBYARD_JOB_LOG", "false")  # the routing is under test, not the log
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/no-job-log.db")
    monkeypatch.setenv("USE_DRAMATIQ", "true")
    reset_writer()
    preferred, fallback = InlineEngine(), InlineEngine()
    dispatcher = Dispatcher(preferred, fallback, CircuitBreaker(lambda: True, 1.0))
    try:
        handle = dispatcher.dispatch("system.echo", {"message": "one"})
        assert (handle.engine, handle.fallback_reason, handle.duplicate) == ("inline", None, False)
        assert preferred.status(handle.job_id) is not None
        assert fallback.status(handle.job_id) is None
        found = dispatcher.status(handle.job_id)
        assert (found.state, found.result) == ("succeeded", {"message": "one"})
        many = dispatcher.dispatch_many([("system.echo", {"message": f"m{i}"}) for i in range(3)])
        assert all(isinstance(h, JobHandle) and h.engine == "inline" for h in many), many
        assert [preferred.status(h.job_id).result for h in many] == [  # type: ignore[union-attr]
            {"message": f"m{i}"} for i in range(3)
        ]
        with pytest.raises(JobNotFoundError):
            dispatcher.status(uuid.uuid4().hex)
    finally:
        reset_writer()


def test_dramatiq_is_a_rescue_source_to_the_letter() -> None:
    """The rescue holds a `RescueSource`, the six calls it makes on the engine it moves jobs
    off: an engine offering them, with these signatures, can be rescued from."""
    from jobyard.dispatcher.engines.dramatiq import DramatiqEngine

    members = [
        name for name, value in vars(RescueSource).items()
        if callable(value) and not name.startswith("_")
    ]  # fmt: skip
    assert sorted(members) == sorted(
        ["collect_orphans", "orphan_moved", "heartbeat_expiries", "missing", "restore_steps",
         "recover"]
    )  # fmt: skip
    for name in members:
        declared = inspect.signature(getattr(RescueSource, name))
        offered = inspect.signature(getattr(DramatiqEngine, name))
        assert list(offered.parameters) == list(declared.parameters), name
        assert offered.return_annotation == declared.return_annotation, name
    assert isinstance(DramatiqEngine.__new__(DramatiqEngine), RescueSource)
    assert not isinstance(InlineEngine(), RescueSource)  # nothing to rescue from: no queues

"""A dispatch Temporal cannot have received is "not started", at once (issue 29, item 3):
DispatchUnavailableError for a refused connection, DispatchOutcomeUnknownError only when the
request may have reached the server. Dramatiq is off (USE_DRAMATIQ=false) or its Redis is down,
so Temporal is the only engine; the Temporal server is real (tests/faults/temporal_crash.py):
never started, SIGKILLed after the dispatcher connected, or SIGSTOPped (connected, silent)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobyard.dispatcher import (
    DispatchOutcomeUnknownError,
    DispatchUnavailableError,
    dispatch_job,
    reset_dispatcher,
)
from jobyard.job_engine.db.joblog import reset_writer
from jobyard.queue.client import reset_clients
from tests.conftest import jobyard_values
from tests.faults.temporal_crash import CrashableTemporal
from tests.support import RedisServer, free_port

#: "At once": well under the engine's timeout (TEMPORAL_START_TIMEOUT, 2 s by default), which is
#: what every such dispatch waited before.
AT_ONCE_SECONDS = 0.5


@pytest.fixture
def temporal(tmp_path: Path) -> Iterator[CrashableTemporal]:
    server = CrashableTemporal(tmp_path / "temporal.db")
    yield server
    server.stop()


@pytest.fixture
def settings(
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    temporal: CrashableTemporal,
    job_log_database: str,
) -> Iterator[dict[str, str]]:
    values = jobyard_values(redis_server, temporal, job_log_database)  # type: ignore[arg-type]
    values["USE_DRAMATIQ"] = "false"
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    _reset()
    yield values
    _reset()


def _reset() -> None:
    reset_dispatcher()
    reset_clients()
    reset_writer()


def _dispatch(
    expected: type[Exception] | tuple[type[Exception], ...],
) -> tuple[float, Exception]:
    started = time.monotonic()
    with pytest.raises(expected) as caught:
        dispatch_job("system.echo", {"n": 1})
    return time.monotonic() - started, caught.value


def test_a_port_that_refuses_is_not_started_at_once(
    settings: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")  # nothing listens
    _reset()
    for _ in range(3):
        seconds, error = _dispatch(DispatchUnavailableError)
        assert seconds < AT_ONCE_SECONDS, (seconds, error)
        assert "was not started" in str(error)


@pytest.mark.parametrize("dramatiq", ["flag-off", "redis-down"])
def test_a_server_killed_after_the_client_connected_is_not_started_at_once(
    settings: dict[str, str],
    temporal: CrashableTemporal,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    dramatiq: str,
) -> None:
    """The dispatcher's client is connected (a dispatch went through); the server is then
    SIGKILLed, so its port refuses: every dispatch is DispatchUnavailableError at once, the
    error's cause kept; once the server is back, dispatches start jobs again."""
    if dramatiq == "redis-down":
        monkeypatch.setenv("USE_DRAMATIQ", "true")
        _reset()
        redis_server.kill()
    temporal.start()
    assert dispatch_job("system.echo", {"n": 1}).engine == "temporal"
    temporal.sigkill()
    # The first request may go into the connection the kill cut before the client saw it go:
    # from the client's side it may have reached the server, so "unknown" is the truth there.
    # Every dispatch after it connects anew, and is refused: "not started", at once.
    _dispatch((DispatchUnavailableError, DispatchOutcomeUnknownError))
    for _ in range(3):
        seconds, error = _dispatch(DispatchUnavailableError)
        assert seconds < AT_ONCE_SECONDS, (seconds, error)
        assert "cannot connect" in str(error), error
        assert error.__cause__ is not None  # the engine's error, itself caused by temporalio's
        assert error.__cause__.__cause__ is not None
    temporal.start()
    assert dispatch_job("system.echo", {"n": 1}).engine == "temporal"


def test_a_server_that_stops_answering_is_unknown(
    settings: dict[str, str], temporal: CrashableTemporal
) -> None:
    """Connected, the request sent, no answer (the server SIGSTOPped): it may have been taken,
    so the outcome is unknown, after the engine's timeout."""
    temporal.start()
    assert dispatch_job("system.echo", {"n": 1}).engine == "temporal"
    assert temporal.proc is not None
    os.killpg(temporal.proc.pid, signal.SIGSTOP)
    try:
        seconds, error = _dispatch(DispatchOutcomeUnknownError)
    finally:
        os.killpg(temporal.proc.pid, signal.SIGCONT)
    assert seconds >= 1.0, seconds
    assert "may have started" in str(error)

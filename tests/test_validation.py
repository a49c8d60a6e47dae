"""Bad input fails at the boundary with a clear error, and nothing reaches an engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobyard.dispatcher import dispatch_job
from jobyard.job_engine import InvalidPayloadError, MissingSettingError, UnknownJobError
from tests.support import ROOT


def _nothing_enqueued(redis_server) -> None:
    client = redis_server.client()
    try:
        assert client.keys("*") == [], "bad input must not touch Redis"
    finally:
        client.close()


@pytest.mark.parametrize(
    ("name", "payload", "error", "match"),
    [
        ("no.such.job", {}, UnknownJobError, "unknown job 'no.such.job'"),
        ("webhook.deliver", {"body": {}}, InvalidPayloadError, "url: Field required"),
        ("webhook.deliver", {"url": "not a url"}, InvalidPayloadError, "url: Input should be"),
        ("webhook.deliver", "{not json", InvalidPayloadError, "not JSON"),
        (
            "webhook.deliver",
            {"url": "http://x", "headers": {"a": 1}},
            InvalidPayloadError,
            "headers.a",
        ),
    ],
)
def test_bad_input_is_refused_before_any_engine(
    jobyard_env, redis_server, name, payload, error, match
):
    with pytest.raises(error, match=match):
        dispatch_job(name, payload)
    _nothing_enqueued(redis_server)


def test_unserialisable_payload_is_refused(jobyard_env, redis_server):
    with pytest.raises(InvalidPayloadError):
        dispatch_job("system.echo", {"when": object()})
    _nothing_enqueued(redis_server)


def test_missing_setting_is_refused_at_dispatch(jobyard_env, redis_server, monkeypatch):
    monkeypatch.delenv("WEBHOOK_SECRET")
    with pytest.raises(MissingSettingError, match="WEBHOOK_SECRET"):
        dispatch_job("webhook.deliver", {"url": "http://127.0.0.1/x"})
    _nothing_enqueued(redis_server)


@pytest.mark.parametrize("job_id", ["", " spaces ", "x" * 201, "../etc"])
def test_bad_job_id_is_refused(jobyard_env, redis_server, job_id):
    with pytest.raises(ValueError, match="invalid job_id"):
        dispatch_job("system.echo", {}, job_id=job_id)
    _nothing_enqueued(redis_server)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["dispatch", "no.such.job"], "unknown job 'no.such.job'"),
        (["dispatch", "webhook.deliver", "--payload", "{nope"], "--payload is not JSON"),
        (["dispatch", "webhook.deliver", "--payload", "{}"], "url: Field required"),
        (["worker", "--queues", "nope"], "unknown queue 'nope'"),
    ],
)
def test_cli_bad_input_exits_nonzero_with_one_line(jobyard_env, redis_server, args, reason):
    done = subprocess.run(
        [sys.executable, "-m", "jobyard.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and reason in done.stderr, done.stderr
    _nothing_enqueued(redis_server)

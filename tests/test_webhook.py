"""webhook.deliver on both engines against a real HTTP receiver that checks signatures. The tests
share the module's workers (`shared_engines`) but the one that sets a queue's attempt cap."""

from __future__ import annotations

import pytest

from jobyard.job_engine import RetryPolicy, signing
from tests.conftest import WEBHOOK_SECRET
from tests.peers import webhook_receiver

ENGINES = ["dramatiq", "temporal"]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBYARD_JOB_WEBHOOK_DELIVER_BACKOFF", "0.2")


@pytest.mark.parametrize("engine", ENGINES)
def test_delivers_signed_body_once(shared_engines, engine):
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        status = shared_engines.run(
            engine,
            "webhook.deliver",
            {"url": receiver.url, "body": {"event": "done", "n": 1}, "headers": {"X-App": "t"}},
        )
    assert status.state == "succeeded", status
    assert status.engine == engine
    assert status.result == {"status": 200}
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request.signature_valid
    assert request.json() == {"event": "done", "n": 1}
    assert request.headers[signing.IDEMPOTENCY_HEADER] == status.job_id
    assert request.headers["X-App"] == "t"
    assert request.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("engine", ENGINES)
def test_retries_after_server_error_then_succeeds(shared_engines, engine):
    with webhook_receiver(WEBHOOK_SECRET, statuses=[500, 200]) as receiver:
        status = shared_engines.run(
            engine, "webhook.deliver", {"url": receiver.url, "body": [1, 2]}
        )
    assert status.state == "succeeded", status
    assert status.attempts == 2
    assert [r.signature_valid for r in receiver.requests] == [True, True]
    assert len({r.headers[signing.IDEMPOTENCY_HEADER] for r in receiver.requests}) == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_client_error_fails_without_retry(shared_engines, engine):
    with webhook_receiver(WEBHOOK_SECRET, statuses=[404]) as receiver:
        status = shared_engines.run(engine, "webhook.deliver", {"url": receiver.url, "body": {}})
    assert status.state == "failed", status
    assert status.attempts == 1
    assert "404" in (status.error or "")
    assert len(receiver.requests) == 1


def test_signature_helper_rejects_tampering():
    body = b'{"a":1}'
    headers = signing.sign("k", "msg-1", body, timestamp=1_700_000_000)
    assert signing.verify("k", body, headers, now=1_700_000_010)
    assert not signing.verify("k", b'{"a":2}', headers, now=1_700_000_010)
    assert not signing.verify("other", body, headers, now=1_700_000_010)
    assert not signing.verify("k", body, headers, now=1_700_000_000 + 3600)
    assert not signing.verify("k", body, {**headers, "webhook-id": "msg-2"}, now=1_700_000_010)


@pytest.mark.parametrize("engine", ENGINES)
def test_retry_policy_is_overridable_per_dispatch(shared_engines, engine):
    with webhook_receiver(WEBHOOK_SECRET, statuses=[500]) as receiver:
        status = shared_engines.run(
            engine,
            "webhook.deliver",
            {"url": receiver.url, "body": {}},
            retry=RetryPolicy(attempts=2, backoff=0.1),
        )
    assert (status.state, status.attempts) == ("dead", 2), status
    assert len(receiver.requests) == 2


def test_queue_caps_attempts(engines, monkeypatch):
    monkeypatch.setenv("QUEUE_MAX_ATTEMPTS_DEFAULT", "3")
    with webhook_receiver(WEBHOOK_SECRET, statuses=[503]) as receiver:
        status = engines.run("dramatiq", "webhook.deliver", {"url": receiver.url, "body": {}})
    assert (status.state, status.attempts) == ("dead", 3), status
    assert len(receiver.requests) == 3

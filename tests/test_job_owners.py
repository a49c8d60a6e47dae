"""A caller-chosen job id runs on one engine, ever: the job id registry (dispatcher/owners.py)
decides, whatever Redis does between two dispatches of the id."""

from __future__ import annotations

import uuid

import pytest

from jobyard.dispatcher import (
    DispatchOutcomeUnknownError,
    IdempotencyConflictError,
    dispatch_job,
    get_dispatcher,
)
from tests.conftest import WEBHOOK_SECRET
from tests.peers import webhook_receiver
from tests.support import wait_for


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_same_id_under_another_name_or_payload_is_a_conflict(engines):
    engines.start_worker()
    job_id = _new_id("order")
    first = dispatch_job("system.echo", {"n": 1}, job_id=job_id)
    assert not first.duplicate
    with pytest.raises(IdempotencyConflictError, match=r"dispatched as job 'system\.echo'"):
        dispatch_job("test.slow", {"seconds": 0, "marker_dir": "/tmp"}, job_id=job_id)
    with pytest.raises(IdempotencyConflictError, match="another payload"):
        dispatch_job("system.echo", {"n": 2}, job_id=job_id)
    assert dispatch_job("system.echo", {"n": 1}, job_id=job_id).duplicate


def test_id_dispatched_during_an_outage_never_reaches_dramatiq_after_it(engines, redis_server):
    """Redis down: the id starts on Temporal at once. Redis back, with live workers: the same id
    is a duplicate on Temporal and never runs on Dramatiq."""
    engines.start_worker()
    engines.start_temporal_worker()
    job_id = _new_id("invoice")
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        payload = {"url": receiver.url, "body": {"invoice": 1}}
        redis_server.pause()
        try:
            during = dispatch_job("webhook.deliver", payload, job_id=job_id)
            assert during.engine == "temporal"
            again = dispatch_job("webhook.deliver", payload, job_id=job_id)
            assert (again.engine, again.duplicate) == ("temporal", True)
        finally:
            redis_server.resume()
        assert engines.wait(job_id).state == "succeeded"
        wait_for(lambda: not get_dispatcher().breaker.is_open, timeout=30)
        after = dispatch_job("webhook.deliver", payload, job_id=job_id)
        assert (after.engine, after.duplicate) == ("temporal", True)
        assert engines.live_workers("default") > 0
    assert len(receiver.requests) == 1


def test_finished_dramatiq_id_is_not_rerun_on_temporal_during_an_outage(engines, redis_server):
    engines.start_worker()
    engines.start_temporal_worker()
    job_id = _new_id("receipt")
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        payload = {"url": receiver.url, "body": {"receipt": 1}}
        first = dispatch_job("webhook.deliver", payload, job_id=job_id)
        assert first.engine == "dramatiq"
        assert engines.wait(job_id).state == "succeeded"
        redis_server.pause()
        try:
            get_dispatcher().breaker.trip("test: Redis paused")
            during = dispatch_job("webhook.deliver", payload, job_id=job_id)
            assert (during.engine, during.duplicate) == ("dramatiq", True)
        finally:
            redis_server.resume()
    assert len(receiver.requests) == 1


def test_unknown_outcome_is_reported_and_a_retry_is_safe(engines, redis_server):
    """The id is Dramatiq's but Redis does not answer: the job may be queued there, so the
    caller hears "unknown", not "not started"; the same dispatch later is a duplicate."""
    engines.start_worker()
    job_id = _new_id("unknown")
    assert dispatch_job("system.echo", {"n": 1}, job_id=job_id).engine == "dramatiq"
    redis_server.pause()
    try:
        with pytest.raises(DispatchOutcomeUnknownError, match="same job_id"):
            dispatch_job("system.echo", {"n": 1}, job_id=job_id)
    finally:
        redis_server.resume()
    wait_for(lambda: not get_dispatcher().breaker.is_open, timeout=30)
    again = dispatch_job("system.echo", {"n": 1}, job_id=job_id)
    assert (again.engine, again.duplicate) == ("dramatiq", True)

"""A caller-supplied job_id is an idempotency key: dispatching it twice runs the job once."""

from __future__ import annotations

import uuid

import pytest

from jobyard.dispatcher import dispatch_job
from tests.conftest import WEBHOOK_SECRET
from tests.peers import webhook_receiver


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_same_job_id_twice_runs_once(shared_engines, engine):
    job_id = f"order-7-paid-{uuid.uuid4().hex[:8]}"  # the job id registry outlives one test
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        payload = {"url": receiver.url, "body": {"order": 7}}
        first = shared_engines.dispatch(engine, "webhook.deliver", payload, job_id=job_id)
        second = shared_engines.dispatch(engine, "webhook.deliver", payload, job_id=job_id)
        assert (first.duplicate, second.duplicate) == (False, True)
        assert shared_engines.wait(first.job_id).state == "succeeded"
        third = dispatch_job("webhook.deliver", payload, job_id=job_id)
        assert third.duplicate and third.engine == engine
    assert len(receiver.requests) == 1


def test_job_owned_by_temporal_never_reaches_dramatiq(engines):
    """No worker: the job goes to Temporal; a later dispatch with live workers must not rerun it."""
    engines.start_temporal_worker()
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        payload = {"url": receiver.url, "body": {}}
        first = dispatch_job("webhook.deliver", payload, job_id="invoice-1")
        assert first.fallback_reason == "no_live_workers"
        engines.start_worker()
        again = dispatch_job("webhook.deliver", payload, job_id="invoice-1")
        assert (again.engine, again.duplicate) == ("temporal", True)
        assert engines.wait("invoice-1").state == "succeeded"
    assert len(receiver.requests) == 1

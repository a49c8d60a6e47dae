"""POST /events/{name}: an event for waiting jobs, behind the API token (tests/api/test_auth.py
has it among the token routes); the body is its data, a JSON object, else a 422."""

from __future__ import annotations

import uuid

import pytest

from jobyard.job_engine.events import SentEvent
from tests.api.conftest import ApiServer


def stored(name: str) -> list[SentEvent]:
    from jobyard.job_engine.db.sent_events import sent_between

    return list(sent_between(name, 0, float("inf")))


def test_an_event_is_stored_with_its_data(api: ApiServer) -> None:
    name = f"payment.confirmed.{uuid.uuid4().hex[:8]}"
    response = api.client.post(f"/events/{name}", json={"order_id": 42, "amount": 9.5})
    assert response.status_code == 202, response.text
    assert response.json()["name"] == name
    [event] = stored(name)
    assert (event.id, event.data) == (response.json()["event_id"], {"order_id": 42, "amount": 9.5})
    assert api.anonymous.post(f"/events/{name}", json={}).status_code == 401
    assert len(stored(name)) == 1


@pytest.mark.parametrize("body", [b"[1, 2]", b"42", b"not json", b'{"a": NaN}', b""])
def test_a_body_that_is_not_a_json_object_is_422(api: ApiServer, body: bytes) -> None:
    name = f"approval.{uuid.uuid4().hex[:8]}"
    response = api.client.post(
        f"/events/{name}", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert stored(name) == []


def test_an_invalid_event_name_is_422(api: ApiServer) -> None:
    response = api.client.post("/events/-starts-with-a-dash", json={})
    assert response.status_code == 422, response.text


def test_event_data_over_the_payload_limit_is_refused_and_not_stored(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBYARD_MAX_PAYLOAD_BYTES", "64")
    name = f"upload.{uuid.uuid4().hex[:8]}"
    from jobyard.dispatcher import send_event

    with pytest.raises(ValueError, match="the limit is 64"):
        send_event(name, {"blob": "x" * 100})
    assert stored(name) == []
    assert send_event(name, {"small": 1}) > 0

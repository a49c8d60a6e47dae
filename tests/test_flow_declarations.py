"""Flow declarations and priorities refuse bad input where it is written, with a clear error;
a payload without its limit's key is refused at dispatch, never run unlimited."""

from __future__ import annotations

import uuid

import pytest
from pydantic import BaseModel

from jobyard.job_engine import (
    InvalidPayloadError,
    JobContext,
    RateLimit,
    get_spec,
    job,
    queue,
    queues,
    registry,
)
from jobyard.job_engine.flow import (
    Concurrency,
    Debounce,
    FlowDeclarationError,
    InvalidPriorityError,
    KeyedRateLimit,
    MissingKeyError,
    check_key_path,
    payload_key,
    rate_limit_key,
    validate_priority,
)
from jobyard.job_engine.flow.limiter import CONCURRENCY
from jobyard.job_engine.flow.waiting import JOB, Hold, describe, scope


class Account(BaseModel):
    tenant_id: str
    region: str | None = None


class Payload(BaseModel):
    document_id: int
    account: Account
    extra: dict[str, object] = {}
    optional_account: Account | None = None


@pytest.mark.parametrize("value", [-100, 0, 100, None])
def test_priorities_in_range_are_accepted(value: int | None) -> None:
    assert validate_priority(value) == (value or 0)


@pytest.mark.parametrize("value", [-101, 101, 1.5, "5", True, [1]])
def test_priorities_out_of_range_or_not_ints_are_refused(value: object) -> None:
    with pytest.raises(InvalidPriorityError, match=r"int from -100 to 100.*got"):
        validate_priority(value)


def test_declarations_check_their_numbers() -> None:
    with pytest.raises(FlowDeclarationError, match=r"Concurrency.limit must be an int"):
        Concurrency(0)
    with pytest.raises(FlowDeclarationError, match=r"Concurrency.limit"):
        Concurrency(True)
    with pytest.raises(FlowDeclarationError, match=r"Debounce.period must be more than 0"):
        Debounce(0)
    with pytest.raises(FlowDeclarationError, match=r"max_wait .* must be at least its period"):
        Debounce(5.0, max_wait=1.0)
    with pytest.raises(FlowDeclarationError, match=r"RateLimit.calls"):
        KeyedRateLimit(0, 60.0)
    with pytest.raises(FlowDeclarationError, match=r"RateLimit.period"):
        KeyedRateLimit(5, float("nan"))
    with pytest.raises(FlowDeclarationError, match="dotted for nested"):
        Concurrency(2, key="account..tenant_id")


def test_a_keyed_rate_limit_is_a_rate_limit() -> None:
    keyed = KeyedRateLimit(60, 60.0, key="account.tenant_id")
    assert isinstance(keyed, RateLimit)
    assert rate_limit_key(keyed) == "account.tenant_id"
    assert rate_limit_key(RateLimit(60, 60.0)) is None
    assert rate_limit_key(None) is None


def test_key_paths_are_checked_against_the_payload_model() -> None:
    check_key_path(Payload, "document_id", "job x")
    check_key_path(Payload, "account.tenant_id", "job x")
    check_key_path(Payload, "optional_account.tenant_id", "job x")
    check_key_path(Payload, "extra.anything", "job x")  # a dict: only a payload can tell
    with pytest.raises(FlowDeclarationError, match="Account has no field 'tenant'"):
        check_key_path(Payload, "account.tenant", "job x")
    with pytest.raises(FlowDeclarationError, match=r"job x: .*Payload has no field 'tenant_id'"):
        check_key_path(Payload, "tenant_id", "job x")
    with pytest.raises(FlowDeclarationError, match="'document_id' is not an object"):
        check_key_path(Payload, "document_id.x", "job x")


def test_payload_keys_are_read_from_the_payload() -> None:
    data = {"document_id": 42, "account": {"tenant_id": "acme"}, "flag": True}
    assert payload_key("j", data, None) == ""
    assert payload_key("j", data, "document_id") == "42"
    assert payload_key("j", data, "account.tenant_id") == "acme"
    assert payload_key("j", data, "flag") == "true"


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ({"account": {}}, "account.tenant_id", "no 'account.tenant_id'"),
        ({}, "document_id", "no 'document_id'"),
        ({"account": "acme"}, "account.tenant_id", "account is not an object"),
        ({"document_id": None}, "document_id", "null"),
        ({"document_id": 1.5}, "document_id", "not float"),
        ({"document_id": [1]}, "document_id", "not list"),
        ({"document_id": "x" * 201}, "document_id", "201 characters"),
    ],
)
def test_a_payload_without_its_key_is_refused_as_an_invalid_payload(
    data: dict[str, object], path: str, reason: str
) -> None:
    with pytest.raises(MissingKeyError, match=reason) as refused:
        payload_key("docs.index", data, path)
    assert isinstance(refused.value, InvalidPayloadError)  # so HTTP answers 422
    assert refused.value.name == "docs.index" and refused.value.path == path


def test_a_hold_says_which_limit_and_key() -> None:
    limit = Concurrency(2, key="account.tenant_id")
    hold = Hold(CONCURRENCY, scope(CONCURRENCY, JOB, "docs.index"), describe(limit),
                limit.key, "acme")  # fmt: skip
    assert hold.display_state == "waiting for slot"
    assert hold.waiting_reason == (
        "concurrency limit concurrency:job:docs.index (2 at once) for account.tenant_id=acme"
    )
    assert describe(KeyedRateLimit(60, 60.0)) == "60 starts per 60s"
    assert describe(Debounce(5.0, max_wait=60.0)) == "debounce 5s (max 60s)"
    with pytest.raises(ValueError, match="unknown limit"):
        scope("throttle", JOB, "x")


@pytest.fixture
def restored_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    """The queues a test declares go with it."""
    monkeypatch.setattr(queues, "_QUEUES", dict(queues._QUEUES))


async def _noop(ctx: JobContext, payload: Payload) -> None:
    return None


def test_a_job_declares_its_limits_and_is_limited_by_its_queues(restored_queues: None) -> None:
    plain = job(f"test.plain_{uuid.uuid4().hex[:8]}", payload=Payload)(_noop)
    assert plain is _noop
    unlimited = next(s for s in registry if s.handler is _noop)
    assert (unlimited.limits, unlimited.limited) == ((), False)

    name = f"test.keyed_{uuid.uuid4().hex[:8]}"
    job(
        name, payload=Payload, rate_limit=RateLimit(5, 1.0, key="account.tenant_id"),
        concurrency=Concurrency(2, key="account.tenant_id"),
        debounce=Debounce(1.0, key="document_id"),
    )(lambda ctx, payload: _noop(ctx, payload))  # fmt: skip
    spec = get_spec(name)
    assert spec.limited and [lim.kind for lim in spec.limits] == ["debounce", "rate", "concurrency"]
    assert spec.limits[1].key_path == "account.tenant_id"

    queue(
        "tenants",
        rate_limit=RateLimit(10, 1.0),
        concurrency_limit=Concurrency(3, key="account.tenant_id"),
    )
    shared = f"test.shared_{uuid.uuid4().hex[:8]}"
    job(shared, queue="tenants", payload=Payload)(lambda ctx, payload: _noop(ctx, payload))
    limits = get_spec(shared).limits
    assert [lim.scope for lim in limits] == ["rate:queue:tenants", "concurrency:queue:tenants"]


def test_a_key_the_payload_model_lacks_fails_at_declaration(restored_queues: None) -> None:
    with pytest.raises(FlowDeclarationError, match="Payload has no field 'tenant'"):
        job("test.bad_key", payload=Payload, concurrency=Concurrency(2, key="tenant"))
    with pytest.raises(FlowDeclarationError, match="RateLimit: key must be a payload field"):
        RateLimit(5, 1.0, key="a..b")
    queue("keyed", rate_limit=RateLimit(5, 1.0, key="tenant"))
    with pytest.raises(FlowDeclarationError, match=r"queue 'keyed'.s RateLimit"):
        job("test.bad_queue_key", queue="keyed", payload=Payload)
    with pytest.raises(LookupError):
        get_spec("test.bad_key")

"""The engines' entry point (jobyard.job_engine.flow.gate) on real PostgreSQL and SQLite: a run
passes all its limits at once or spends nothing, says why it waits, keeps its slot while its
worker renews it, and debounced dispatches collapse into one run with the last payload."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from jobyard.job_engine.db.migrate import upgrade
from jobyard.job_engine.flow import Concurrency, Debounce, KeyedRateLimit, MissingKeyError
from jobyard.job_engine.flow.gate import Gate, LeaseRenewer, collapse, job_limits
from jobyard.job_engine.flow.store import PermitStore
from tests.support import migrated_pg_database

TTL, PARK = 30.0, 60.0


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with migrated_pg_database("jobyard_test_flow_gate") as url:
        yield url


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('flowgate') / 'jobyard.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest) -> PermitStore:
    name = "pg_url" if request.param == "postgresql" else "sqlite_url"
    return PermitStore(str(request.getfixturevalue(name)))


def _job() -> str:
    return f"flow.test.{os.getpid()}.{time.monotonic_ns()}"


def _counts(store: PermitStore, scope_prefix: str) -> dict[str, tuple[int, int, int]]:
    return {
        c.scope.split(":", 1)[0]: (c.running, c.waiting, c.recent_starts)
        for c in store.counts()
        if c.scope.endswith(scope_prefix)
    }


def test_an_unlimited_job_has_no_limits() -> None:
    assert job_limits("x", "default") == ()


def test_waiting_for_a_slot_spends_no_rate_permit(store: PermitStore) -> None:
    job = _job()
    limits = job_limits(
        job, "default", rate_limit=KeyedRateLimit(2, 60.0, key="tenant"),
        concurrency=Concurrency(1, key="tenant"),
    )  # fmt: skip
    data = {"tenant": "acme"}

    def gate(job_id: str) -> Gate:
        return Gate(store, job, job_id, data, limits, ttl=TTL, park=PARK)

    first = gate("j1")
    first_start = first.acquire()
    assert first_start.granted
    second = gate("j2")
    for _ in range(3):  # asks again and again while j1 runs
        refused = second.acquire()
        assert not refused.granted and refused.refused is not None
        assert refused.refused.kind == "concurrency"
    hold = second.hold(refused)
    assert hold is not None and hold.display_state == "waiting for slot"
    assert hold.waiting_reason == (
        f"concurrency limit concurrency:job:{job} (1 at once) for tenant=acme"
    )
    assert _counts(store, job) == {"rate": (0, 0, 1), "concurrency": (1, 1, 0)}
    woken = first.release()
    assert [w.holder for w in woken] == ["j2"]
    assert second.acquire().granted  # the second of two rate permits
    second.release()
    third = gate("j3").acquire()
    assert not third.granted and third.refused is not None and third.refused.kind == "rate"
    assert abs(third.retry_in - (first_start.at + 60 - third.at)) < 0.002  # j1's start + 60 s


def test_waiting_for_the_rate_holds_no_slot(store: PermitStore) -> None:
    job = _job()
    limits = job_limits(job, "default", rate_limit=KeyedRateLimit(1, 60.0),
                        concurrency=Concurrency(5))  # fmt: skip
    assert Gate(store, job, "j1", {}, limits, ttl=TTL, park=PARK).acquire().granted
    refused = Gate(store, job, "j2", {}, limits, ttl=TTL, park=PARK).acquire()
    assert not refused.granted and refused.refused is not None
    assert refused.refused.kind == "rate"
    assert _counts(store, job)["concurrency"] == (1, 0, 0)  # only j1: j2 neither runs nor waits


def test_a_debounced_burst_is_claimed_once_with_its_last_payload(store: PermitStore) -> None:
    job = _job()
    debounce = Debounce(2.0, key="doc", max_wait=10.0)  # room for a loaded machine
    tickets = [collapse(store, job, f"j{n}", {"doc": 42, "n": n}, debounce) for n in range(3)]
    other = collapse(store, job, "x1", {"doc": 7, "n": 0}, debounce)
    assert [t.joined for t in tickets] == [False, True, True] and not other.joined
    assert {t.run_id for t in tickets} == {"j0"}
    # The run is also rate limited, and the rate is used up: the burst stays for later.
    limits = job_limits(job, "default", debounce=debounce, rate_limit=KeyedRateLimit(1, 3.0))
    rate_scope = limits[1].scope
    time.sleep(max(0.0, tickets[-1].due / 1000 - store.now()) + 0.01)
    assert store.acquire_rate(rate_scope, "", 1, 3.0).granted
    run = Gate(store, job, "j0", {"doc": 42, "n": 0}, limits, ttl=TTL, park=PARK)
    refused = run.acquire()
    assert not refused.granted and refused.refused is not None
    assert refused.refused.kind == "rate"
    time.sleep(refused.retry_in + 0.01)
    admitted = run.acquire()
    assert admitted.granted and admitted.debounce is not None
    assert admitted.debounce.payload == {"doc": 42, "n": 2}
    assert admitted.debounce.members == ("j0", "j1", "j2")
    # A rerun of the same run (a retry) gets the same burst, not the dispatch's own payload.
    time.sleep(3.01)
    again = run.acquire()
    assert again.granted and again.debounce == admitted.debounce
    waiting = {c.bucket: c.waiting for c in store.counts() if c.scope == limits[0].scope}
    assert waiting == {"7": 1}  # key 7's burst waits; 42's started (nothing waits there)


def test_a_payload_without_its_key_never_gets_a_gate(store: PermitStore) -> None:
    limits = job_limits("docs.index", "default", concurrency=Concurrency(1, key="tenant.id"))
    with pytest.raises(MissingKeyError, match=r"no 'tenant\.id'"):
        Gate(store, "docs.index", "j1", {"tenant": {}}, limits, ttl=TTL, park=PARK)


def test_a_renewed_lease_outlives_its_ttl_and_an_abandoned_one_does_not(
    store: PermitStore,
) -> None:
    job = _job()
    limits = job_limits(job, "default", concurrency=Concurrency(1))
    ttl = 1.5  # renewed every 0.5 s: room for a loaded machine
    running = Gate(store, job, "j1", {}, limits, ttl=ttl, park=PARK)
    assert running.acquire().granted
    lost: list[str] = []
    renewer = LeaseRenewer(store, ttl, on_lost=lambda slot: lost.append(slot.holder))
    renewer.track("j1", running.held)
    try:
        time.sleep(ttl * 2.5)
        assert not Gate(store, job, "j2", {}, limits, ttl=ttl, park=PARK).acquire().granted
        renewer.untrack("j1")  # its worker is gone
        time.sleep(ttl + 0.1)
        assert Gate(store, job, "j2", {}, limits, ttl=TTL, park=PARK).acquire().granted
        renewer.track("j1", running.held)  # j1's worker comes back: its slot is taken
        assert [s.holder for s in renewer.renew_now()] == ["j1"] and lost == ["j1"]
    finally:
        renewer.stop()


def test_prometheus_counts_what_the_store_holds(store: PermitStore) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from jobyard.job_engine.flow.metrics import FlowCollector
    from tests.support import metric_samples, metric_value

    job = _job()
    limits = job_limits(job, "default", concurrency=Concurrency(1, key="tenant"))
    for n, tenant in enumerate(["big", "big", "big", "small", "small"]):
        Gate(store, job, f"j{n}", {"tenant": tenant}, limits, ttl=TTL, park=PARK).acquire()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlowCollector(lambda: store, top_keys=1))
    samples = metric_samples(generate_latest(registry).decode())
    scope = limits[0].scope
    assert metric_value(samples, "jobyard_flow_running", scope=scope) == 2
    assert metric_value(samples, "jobyard_flow_waiting", scope=scope) == 3
    assert metric_value(samples, "jobyard_flow_waiting_by_key", scope=scope, key="big") == 2
    assert not [k for k in samples if k[0] == "jobyard_flow_waiting_by_key" and
                ("key", "small") in k[1] and ("scope", scope) in k[1]]  # fmt: skip


def test_held_runs_count_per_queue_and_key_until_granted_or_past_their_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from jobyard.job_engine.flow import metrics
    from tests.support import metric_samples, metric_value

    monkeypatch.setattr(metrics, "HELD_SLACK_SECONDS", 0.0)
    held = metrics.HeldRuns(top_keys=1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(held)

    def value(name: str, **labels: str) -> float:
        return metric_value(metric_samples(generate_latest(registry).decode()), name, **labels)

    for job_id, key in (("b1", "big"), ("b2", "big"), ("s1", "small")):
        held.held(job_id, "docs", "concurrency:job:x", "concurrency", key, 60.0)
    held.held("r1", "docs", "rate:job:y", "rate", "big", 0.2)
    assert value("jobyard_temporal_held", queue="docs", kind="concurrency") == 3
    assert value("jobyard_temporal_held", queue="docs", kind="rate") == 1
    assert value("jobyard_temporal_held_by_key", scope="concurrency:job:x", key="big") == 2
    assert value("jobyard_temporal_held_by_key", key="small") == 0  # only the top key
    held.held("b1", "docs", "concurrency:job:x", "concurrency", "big", 60.0)  # asked again
    held.let_go("b2")  # granted (or released)
    time.sleep(0.3)  # r1's retry time passed: it asks again, and counts again if refused
    assert value("jobyard_temporal_held", queue="docs") == 2


def test_admission_at_dispatch_keeps_a_key_to_its_limit_in_the_queue(store: PermitStore) -> None:
    job = _job()
    limits = job_limits(job, "default", concurrency=Concurrency(2, key="tenant"),
                        rate_limit=KeyedRateLimit(100, 60.0))  # fmt: skip

    def gate(job_id: str, tenant: str) -> Gate:
        return Gate(store, job, job_id, {"tenant": tenant}, limits, ttl=TTL, park=PARK)

    admitted = [gate(f"big{n}", "big").admit(ttl=60.0) for n in range(5)]
    assert [a.granted for a in admitted] == [True, True, False, False, False]
    assert gate("small0", "small").admit(ttl=60.0).granted  # another key is not held back
    assert "rate" not in _counts(store, job)  # admission counts no start
    first = gate("big0", "big")
    assert first.acquire().granted  # its start renews the lease admission took
    assert not gate("big2", "big").acquire().granted  # still 2: big0 running, big1 admitted
    assert [w.holder for w in first.release()] == ["big2"]
    assert gate("big2", "big").acquire().granted
    unlimited = job_limits(job, "default", rate_limit=KeyedRateLimit(100, 60.0))
    assert Gate(store, job, "r1", {}, unlimited, ttl=TTL, park=PARK).admit(ttl=60.0).granted

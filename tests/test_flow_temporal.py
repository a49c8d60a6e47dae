"""Flow control on Temporal (docs/flow-control.md), with a real `jobyard temporal-worker` on the
session's dev server and USE_DRAMATIQ=false: each jobyard queue's steps on a task queue of their
own, at most the queue's concurrency at once per worker process, one queue never waiting for
another's slots; `jobyard temporal-worker --queues` runs only those queues' steps. Keyed limits
held by the permit store (in the session's job log database), checked from the runs' own
records: no window over a rate limit per key (on the grants' database stamps), never more runs
of a key at once than its concurrency limit, and a held job holding no activity slot."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from temporalio.common import Priority

from jobyard.cli.main import main as cli_main
from jobyard.dispatcher import (
    JobHandle,
    JobStatus,
    cancel_job,
    dispatch_job,
    get_dispatcher,
    get_job,
)
from jobyard.dispatcher.engines.temporal.engine import fairness_key, task_priority
from jobyard.job_engine.db import get_engine
from jobyard.job_engine.db.models import JobLog
from tests.engines import Engines
from tests.flow_temporal_jobs import NARROW_CONCURRENCY, ONE_SLOT, QUIET, RATE, SLOT
from tests.support import (
    RedisServer,
    free_port,
    metric_samples,
    metric_value,
    most_at_once,
    wait_for,
)

JOB_MODULES = "tests.jobs,tests.flow_temporal_jobs"


@pytest.fixture
def flow_env(jobyard_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("JOBYARD_JOB_MODULES", JOB_MODULES)
    return {**jobyard_env, "JOBYARD_JOB_MODULES": JOB_MODULES}


def spans(directory: Path) -> list[tuple[str, float, float, int]]:
    """(label, start, end, pid) of every finished step, in the order they finished."""
    path = directory / "spans"
    if not path.exists():
        return []
    return [
        (label, float(start), float(end), int(pid))
        for label, start, end, pid in (line.split() for line in path.read_text().splitlines())
    ]


def test_a_queue_runs_at_most_its_concurrency_of_steps_and_blocks_no_other_queue(
    flow_env: dict[str, str], engines: Engines, tmp_path: Path
) -> None:
    """6 steps of 2.5 s on `tq-narrow` (concurrency 2) take three turns of 2; a step of
    `tq-wide`, dispatched after them, runs during the first turn, not after the backlog."""
    engines.ensure_temporal_worker()
    narrow = [
        engines.dispatch(
            "temporal", "tq.narrow", {"marker_dir": str(tmp_path), "label": f"n{i}", "seconds": 2.5}
        )
        for i in range(3 * NARROW_CONCURRENCY)
    ]
    wide = engines.dispatch(
        "temporal", "tq.wide", {"marker_dir": str(tmp_path), "label": "w", "seconds": 0.1}
    )
    for handle in [*narrow, wide]:
        assert engines.wait(handle.job_id, timeout=120).state == "succeeded", engines.logs()
    runs = spans(tmp_path)
    narrow_runs = [run for run in runs if run[0].startswith("n")]
    (wide_run,) = [run for run in runs if run[0] == "w"]
    assert len(narrow_runs) == 3 * NARROW_CONCURRENCY
    assert most_at_once(run[1:] for run in narrow_runs) == NARROW_CONCURRENCY, narrow_runs
    last_narrow_start = max(start for _, start, _, _ in narrow_runs)
    assert wide_run[2] < last_narrow_start, (wide_run, narrow_runs)


def test_a_temporal_worker_told_its_queues_runs_only_their_steps(
    flow_env: dict[str, str], engines: Engines, tmp_path: Path
) -> None:
    """`--queues tq-wide`: the workflows of every job run, the steps of tq-wide only; a
    tq-narrow step waits on its task queue until a worker for tq-narrow polls it."""
    engines.start_temporal_worker("--queues", "tq-wide")
    narrow = engines.dispatch(
        "temporal", "tq.narrow", {"marker_dir": str(tmp_path), "label": "n", "seconds": 0}
    )
    wide = engines.dispatch(
        "temporal", "tq.wide", {"marker_dir": str(tmp_path), "label": "w", "seconds": 0}
    )
    assert engines.wait(wide.job_id, timeout=90).state == "succeeded"
    assert engines.wait(narrow.job_id, timeout=3, states=("running",)).state == "running"
    assert [label for label, *_ in spans(tmp_path)] == ["w"]
    engines.start_temporal_worker("--queues", "tq-narrow")
    assert engines.wait(narrow.job_id, timeout=90).state == "succeeded"
    assert sorted(label for label, *_ in spans(tmp_path)) == ["n", "w"]


def test_a_temporal_worker_told_an_unknown_queue_says_so(
    flow_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["temporal-worker", "--queues", "tq-wide,nope"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unknown queue 'nope'" in err and "tq-wide" in err, err


def dispatch_tenant(engines: Engines, name: str, directory: Path, label: str, tenant: str,
                    seconds: float = 0.0) -> JobHandle:  # fmt: skip
    payload = {"marker_dir": str(directory), "label": label, "tenant": tenant, "seconds": seconds}
    return engines.dispatch("temporal", name, payload)


def succeeded(engines: Engines, handles: list[JobHandle], timeout: float = 120) -> None:
    for handle in handles:
        status = engines.wait(handle.job_id, timeout=timeout)
        assert status.state == "succeeded", (status, engines.logs())


def run_spans(directory: Path) -> dict[str, tuple[float, float]]:
    """Per run (label), from its first step's start to its last step's end."""
    found: dict[str, tuple[float, float]] = {}
    for label, start, end, _ in spans(directory):
        first, last = found.get(label, (start, end))
        found[label] = (min(first, start), max(last, end))
    return found


def started_at(database_url: str, job_ids: list[str]) -> dict[str, float]:
    """The job log's started_at of each job: for a limited job, its grant's database time."""

    def read() -> dict[str, float] | None:
        table = JobLog.__table__
        with get_engine(database_url).connect() as connection:
            rows = connection.execute(
                select(table.c.job_id, table.c.started_at).where(table.c.job_id.in_(job_ids))
            ).all()
        found = {job_id: at.timestamp() for job_id, at in rows if at is not None}
        return found if len(found) == len(job_ids) else None

    return wait_for(read, timeout=30)


def most_in_a_window(starts: list[float], period: float) -> int:
    """The most starts in any window (t - period, t]."""
    starts = sorted(starts)
    return max(sum(1 for s in starts if t - period < s <= t) for t in starts)


def held(
    handles: JobHandle | list[JobHandle], display_state: str, engines: Engines | None = None
) -> JobStatus:
    """The status of the first of `handles` seen showing `display_state` (the workflows of a
    burst take their permits in no set order: which ones wait is not known in advance); the
    last ones seen, and the workers' logs, if none does."""
    ids = [h.job_id for h in handles] if isinstance(handles, list) else [handles.job_id]
    seen: list[JobStatus] = []

    def shows() -> JobStatus | None:
        for job_id in ids:
            seen.append(get_job(job_id))
            if seen[-1].display_state == display_state:
                return seen[-1]
        return None

    try:
        return wait_for(shows, timeout=60, interval=0.2)
    except AssertionError as exc:
        logs = engines.logs() if engines is not None else ""
        raise AssertionError(f"none {display_state!r}: {seen[-len(ids) :]}\n{logs}") from exc


def running(engines: Engines, handle: JobHandle) -> None:
    """Once the job's run has begun (its permits taken): the next ones of its key wait."""
    engines.wait(handle.job_id, timeout=60, states=("running",))


def test_a_rate_limit_per_key_holds_in_every_window_on_temporal(
    flow_env: dict[str, str], engines: Engines, tmp_path: Path
) -> None:
    """6 runs of tenant a under RateLimit(2, 1.5 s, key=tenant) start 2 per window, as soon
    as each window allows; tenant b's 2 runs, dispatched first, count apart: a's first two
    start beside them."""
    engines.ensure_temporal_worker()
    b = [dispatch_tenant(engines, "tq.rated", tmp_path, f"b{i}", "b") for i in range(2)]
    a = [dispatch_tenant(engines, "tq.rated", tmp_path, f"a{i}", "a") for i in range(6)]
    late = held(a, "throttled", engines)
    assert late.state == "queued" and late.run_at is not None, late
    assert late.waiting_reason == "rate limit rate:job:tq.rated (2 starts per 1.5s) for tenant=a"
    succeeded(engines, [*a, *b])
    stamps = started_at(flow_env["DATABASE_URL"], [h.job_id for h in [*a, *b]])
    a_starts = sorted(stamps[h.job_id] for h in a)
    b_starts = sorted(stamps[h.job_id] for h in b)
    print(f"\ntenant a starts (s after the first): {[round(t - a_starts[0], 3) for t in a_starts]}")
    assert most_in_a_window(a_starts, RATE.period) == RATE.calls
    assert most_in_a_window(b_starts, RATE.period) == RATE.calls
    # 6 starts, 2 per window: the last at least two periods after the first, not much later
    assert 2 * RATE.period <= a_starts[-1] - a_starts[0] < 2 * RATE.period + 6, a_starts
    # one bucket for both tenants would never let more than 2 into a window
    assert most_in_a_window([*a_starts, *b_starts], RATE.period) > RATE.calls, (a_starts, b_starts)


def test_a_concurrency_limit_per_key_holds_across_steps_and_sleeps_on_temporal(
    flow_env: dict[str, str], engines: Engines, tmp_path: Path
) -> None:
    """Runs of 2 steps and a durable sleep, longer than a lease's ttl (3 s here): 5 of tenant
    a run 2 at a time (their leases renewed and extended over the sleep), tenant b's 2 beside
    them."""
    engines.ensure_temporal_worker()
    a = [dispatch_tenant(engines, "tq.keyed", tmp_path, f"a{i}", "a", 3.0) for i in range(5)]
    b = [dispatch_tenant(engines, "tq.keyed", tmp_path, f"b{i}", "b", 3.0) for i in range(2)]
    waiting = held(a, "waiting for slot", engines)
    assert waiting.waiting_reason == (
        "concurrency limit concurrency:job:tq.keyed (2 at once) for tenant=a"
    )
    succeeded(engines, [*a, *b], timeout=180)
    runs = run_spans(tmp_path)
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for label, span in runs.items():
        by_key[label[0]].append(span)
    assert len(by_key["a"]) == 5 and len(by_key["b"]) == 2
    assert most_at_once(by_key["a"]) == SLOT.limit, by_key["a"]
    assert most_at_once(by_key["b"]) == SLOT.limit, by_key["b"]
    assert most_at_once([*by_key["a"], *by_key["b"]]) > SLOT.limit  # keys ran side by side


def test_a_job_held_for_a_slot_holds_no_activity_slot(
    flow_env: dict[str, str], engines: Engines, tmp_path: Path
) -> None:
    """tq-pair runs 2 steps at once; tq.slot allows 1 run per tenant. With a1 running and a2
    held, b1's step takes the queue's other activity slot at once: a2 waits in a timer, not in
    an activity."""
    engines.ensure_temporal_worker()
    a1 = dispatch_tenant(engines, "tq.slot", tmp_path, "a1", "a", 4.0)
    running(engines, a1)
    a2 = dispatch_tenant(engines, "tq.slot", tmp_path, "a2", "a", 0.2)
    waiting = held(a2, "waiting for slot")
    assert (waiting.state, waiting.attempts) == ("queued", 0)
    assert waiting.waiting_reason == (
        f"concurrency limit concurrency:job:tq.slot ({ONE_SLOT.limit} at once) for tenant=a"
    )
    b1 = dispatch_tenant(engines, "tq.slot", tmp_path, "b1", "b", 0.2)
    a3 = dispatch_tenant(engines, "tq.slot", tmp_path, "a3", "a", 0.2)
    held(a3, "waiting for slot")
    cancel_job(a3.job_id)  # a held job cancels like a queued one: its place is given up
    assert engines.wait(a3.job_id).state == "cancelled"
    succeeded(engines, [a1, a2, b1])
    runs = run_spans(tmp_path)
    assert runs["b1"][1] < runs["a1"][1], runs  # b1 ended while a1 still ran
    assert runs["a2"][0] >= runs["a1"][1], runs  # a2 only after a1 released its slot
    assert "a3" not in runs
    assert get_job(a2.job_id).display_state is None


def test_a_debounced_burst_runs_once_with_its_last_payload_on_temporal(
    flow_env: dict[str, str], engines: Engines, tmp_path: Path
) -> None:
    """4 dispatches of tenant a within Debounce(3 s): one run, with the last payload, at
    least 3 s after the last dispatch; the other 3 lead to it. Tenant b's is its own run."""
    engines.ensure_temporal_worker()
    burst = [dispatch_tenant(engines, "tq.debounced", tmp_path, f"a{i}", "a") for i in range(4)]
    last_dispatch = time.time()
    other = dispatch_tenant(engines, "tq.debounced", tmp_path, "b0", "b")
    run = burst[0]
    assert [h.served_by for h in burst] == [None, run.job_id, run.job_id, run.job_id], burst
    assert other.served_by is None
    waiting = held(run, "debouncing")
    assert waiting.state == "queued"
    assert (
        waiting.waiting_reason
        == f"debounce limit debounce:job:tq.debounced (debounce {QUIET.period:g}s) for tenant=a"
    )
    succeeded(engines, [run, other])
    assert sorted(label for label, *_ in spans(tmp_path)) == ["a3", "b0"]  # the last payload
    (a_run,) = [s for s in spans(tmp_path) if s[0] == "a3"]
    assert a_run[1] >= last_dispatch + QUIET.period - 0.05, (a_run, last_dispatch)
    for handle in burst[1:]:
        status = get_job(handle.job_id)
        assert (status.state, status.display_state, status.served_by) == (
            "succeeded",
            "collapsed",
            run.job_id,
        ), status


def test_a_rate_limit_counts_the_starts_of_both_engines_across_a_redis_outage(
    flow_env: dict[str, str], engines: Engines, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Tenant a's first 2 runs start on Dramatiq; Redis is stopped; the next 4 fall back to
    Temporal. RateLimit(2, 1.5 s) counts all 6 in one permit store: Temporal's first start
    waits for the window of Dramatiq's two (it would start at once if the engines counted
    apart), and no window of either engine's starts holds more than 2."""
    engines.start_worker(queues="tq-wide")
    engines.ensure_temporal_worker()

    def dispatch(label: str) -> JobHandle:
        payload = {"marker_dir": str(tmp_path), "label": label, "tenant": "a"}
        return dispatch_job("tq.rated", payload)

    on_dramatiq = [dispatch(f"d{i}") for i in range(2)]
    assert {h.engine for h in on_dramatiq} == {"dramatiq"}, on_dramatiq
    succeeded(engines, on_dramatiq)
    database = flow_env["DATABASE_URL"]
    dramatiq_starts = started_at(database, [h.job_id for h in on_dramatiq])  # shipped by now
    redis_server.kill()
    on_temporal = [dispatch(f"t{i}") for i in range(4)]
    assert {h.engine for h in on_temporal} == {"temporal"}, on_temporal
    succeeded(engines, on_temporal)
    temporal_starts = started_at(database, [h.job_id for h in on_temporal])
    starts = sorted([*dramatiq_starts.values(), *temporal_starts.values()])
    print(f"\nstarts (s after the first): {[round(t - starts[0], 3) for t in starts]}")
    # Dramatiq's job log stamps its start a moment after the grant (its Lua start), Temporal's
    # at the grant: windows a little shorter than the period absorb that lag.
    assert most_in_a_window(starts, RATE.period - 0.1) == RATE.calls, starts
    assert min(temporal_starts.values()) > min(dramatiq_starts.values()) + RATE.period - 0.1


def test_a_slot_whose_holder_was_terminated_goes_to_the_next_live_waiter_by_the_sweep(
    flow_env: dict[str, str],
    engines: Engines,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Concurrency(1): a1 holds tenant a's slot, a2 and a3 wait; a1 and a2 are terminated (no
    release, no goodbye). a3, parked for one to two JOBYARD_FLOW_PARK_SECONDS (60 s: it was a
    turn from a slot), is woken by the temporal-worker's rescue sweep once a1's lease and a2's
    place ran out (3 s each here)."""
    monkeypatch.setenv("JOBYARD_RESCUE_INTERVAL", "1")
    engines.ensure_temporal_worker()
    a1 = dispatch_tenant(engines, "tq.slot", tmp_path, "a1", "a", 20.0)
    running(engines, a1)
    a2 = dispatch_tenant(engines, "tq.slot", tmp_path, "a2", "a")
    held(a2, "waiting for slot")
    a3 = dispatch_tenant(engines, "tq.slot", tmp_path, "a3", "a")
    held(a3, "waiting for slot")
    temporal = get_dispatcher().temporal

    async def terminate(job_id: str) -> None:
        client = await temporal.client()  # type: ignore[attr-defined]
        await client.get_workflow_handle(job_id).terminate("test: gone without releasing")

    for handle in (a1, a2):
        temporal.run(terminate(handle.job_id))  # type: ignore[attr-defined]
    terminated = time.time()
    succeeded(engines, [a3], timeout=40)
    (a3_run,) = [run for run in spans(tmp_path) if run[0] == "a3"]
    waited = a3_run[1] - terminated
    print(f"\na3 started {waited:.1f} s after its holder and the waiter ahead were terminated")
    assert waited < 20, waited  # the park alone would have kept it 60 s


@pytest.mark.parametrize("holder_engine", ["dramatiq", "temporal"])
def test_a_release_on_either_engine_wakes_the_waiter_on_the_other(
    flow_env: dict[str, str],
    engines: Engines,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    holder_engine: str,
) -> None:
    """Concurrency(1): a1 holds tenant a's slot on one engine, a2 waits for it on the other.
    a1's release wakes a2 there at once: a Temporal workflow by its wake signal, a parked
    Dramatiq job in Redis. Unwoken, a2 would ask again only at a1's lease expiry (up to the
    20 s ttl set here), and no sweep runs in the test's time."""
    monkeypatch.setenv("WORKER_HEARTBEAT_TIMEOUT", "20")
    monkeypatch.setenv("JOBYARD_RESCUE_INTERVAL", "120")
    engines.start_worker(queues="tq-pair")
    engines.ensure_temporal_worker()
    waiter_engine = "temporal" if holder_engine == "dramatiq" else "dramatiq"
    payload = {"marker_dir": str(tmp_path), "tenant": "a"}
    a1 = engines.dispatch(holder_engine, "tq.slot", {**payload, "label": "a1", "seconds": 4.0})
    running(engines, a1)
    a2 = engines.dispatch(waiter_engine, "tq.slot", {**payload, "label": "a2"})
    assert held(a2, "waiting for slot", engines).engine == waiter_engine
    succeeded(engines, [a1, a2], timeout=60)
    runs = run_spans(tmp_path)
    assert runs["a2"][0] >= runs["a1"][1], runs  # never both at once
    delay = runs["a2"][0] - runs["a1"][1]
    print(f"\n{waiter_engine} waiter started {delay:.3f} s after the {holder_engine} holder ended")
    assert delay < 4.0, (delay, engines.logs())


def test_a_temporal_worker_exports_its_held_jobs_per_queue_and_key(
    flow_env: dict[str, str], engines: Engines, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jobyard temporal-worker`'s /metrics: a1 holds tenant a's slot, a2 and a3 wait. The
    workflows it holds count per queue and per key (no Redis parked set counts them), beside
    the permit store's per-limit counts and the refusals; all back to 0 once they ran."""
    port = free_port()
    monkeypatch.setenv("TEMPORAL_WORKER_METRICS_PORT", str(port))
    engines.start_temporal_worker()
    a1 = dispatch_tenant(engines, "tq.slot", tmp_path, "a1", "a", 6.0)
    running(engines, a1)
    waiting = [dispatch_tenant(engines, "tq.slot", tmp_path, f"a{i}", "a") for i in (2, 3)]
    url = f"http://127.0.0.1:{port}/metrics"
    scope = "concurrency:job:tq.slot"

    def scraped(held_now: int) -> dict[tuple[str, tuple[Any, ...]], float] | None:
        samples = metric_samples(httpx.get(url, timeout=5).text)
        per_queue = metric_value(samples, "jobyard_temporal_held", queue="tq-pair")
        return samples if per_queue == held_now else None

    samples = wait_for(lambda: scraped(2), timeout=30, interval=0.2)
    assert metric_value(samples, "jobyard_temporal_held", queue="tq-pair", kind="concurrency") == 2
    assert metric_value(samples, "jobyard_temporal_held_by_key", scope=scope, key="a") == 2
    assert metric_value(samples, "jobyard_flow_waiting", scope=scope) == 2  # the permit store's
    assert metric_value(samples, "jobyard_flow_running", scope=scope) == 1
    assert metric_value(samples, "jobyard_flow_held_total", scope=scope) >= 2
    succeeded(engines, [a1, *waiting])
    samples = wait_for(lambda: scraped(0), timeout=10, interval=0.2)
    assert metric_value(samples, "jobyard_temporal_held_by_key", scope=scope) == 0


def test_a_concurrency_keyed_job_starts_with_its_key_as_temporal_fairness_key() -> None:
    assert fairness_key("tq.keyed", {"tenant": "acme"}) == "acme"
    assert fairness_key("tq.slot", {"tenant": 42}) == "42"  # payload_key's text of an int
    long = fairness_key("tq.keyed", {"tenant": "x" * 200})
    assert long is not None and len(long.encode()) == 64  # hashed to Temporal's 64 bytes
    assert fairness_key("tq.rated", {"tenant": "acme"}) is None  # a rate key is no slot key
    assert fairness_key("tq.keyed", {}) is None  # refused at dispatch, not here
    assert task_priority(0) == Priority.default
    assert task_priority(0, "acme") == Priority(fairness_key="acme")
    assert task_priority(100, "acme") == Priority(priority_key=1, fairness_key="acme")


def test_what_a_limited_job_adds_to_its_workflow_history(
    flow_env: dict[str, str], engines: Engines, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-step job, unlimited, rate-limited and concurrency-keyed, none of them refused: the
    limits cost the patch's marker and search attribute, a marker per permit call (a local
    activity: no task round trip), and for a lease its renewal timer, nothing else. (Workflow
    tasks vary from run to run with timing; these events do not.)"""
    monkeypatch.setenv("WORKER_HEARTBEAT_TIMEOUT", "30")  # no renewal due in a short run
    engines.ensure_temporal_worker()
    temporal = get_dispatcher().temporal
    runs = {
        "unlimited": dispatch_tenant(engines, "tq.wide", tmp_path, "w", "solo"),
        "rate": dispatch_tenant(engines, "tq.rated", tmp_path, "r", "solo"),
        "concurrency": dispatch_tenant(engines, "tq.slot", tmp_path, "s", "solo"),
    }
    succeeded(engines, list(runs.values()))

    async def history(job_id: str) -> list[str]:
        client = await temporal.client()  # type: ignore[attr-defined]
        events = (await client.get_workflow_handle(job_id).fetch_history()).events
        return [(event.WhichOneof("attributes") or "").removesuffix("_event_attributes")
                for event in events]  # fmt: skip

    counted = ("marker_recorded", "timer_started", "timer_canceled",
               "upsert_workflow_search_attributes")  # fmt: skip
    events = {
        name: Counter(
            kind
            for kind in temporal.run(history(handle.job_id))  # type: ignore[attr-defined]
            if kind in counted
        )
        for name, handle in runs.items()
    }
    print(f"\n{events}")
    # the running and succeeded events' markers
    assert events["unlimited"] == Counter(marker_recorded=2)
    # workflow.patched: a marker and its search attribute; the acquire: a marker
    assert events["rate"] == Counter(marker_recorded=4, upsert_workflow_search_attributes=1)
    # and the release's marker, the lease's renewal timer started and cancelled at the release
    assert events["concurrency"] == Counter(
        marker_recorded=5, upsert_workflow_search_attributes=1, timer_started=1, timer_canceled=1
    )

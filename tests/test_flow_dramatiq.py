"""Flow control on Dramatiq, end to end with real worker processes (docs/flow-control.md): every
run records its permit's grant time, its start and end and its attempt (tests/flow_jobs.py),
and the limits are checked from those records: no window holds more than `calls` grants per
key, no key has more than `limit` runs overlapping, a small key is not stuck behind a big
one, a debounced burst runs once with its last payload, and a held job holds no worker thread
and spends no attempt. The permit store and the job log are a PostgreSQL database of their own.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobyard.dispatcher import dispatch_job, dispatch_many, get_job
from jobyard.job_engine import MissingKeyError, env
from jobyard.job_engine.db import dispose_engines
from jobyard.job_engine.flow import runtime
from jobyard.job_engine.flow.store import dispose_store_engines
from jobyard.job_engine.registry import load_job_modules
from jobyard.queue import keys
from tests.engines import Engines
from tests.flow_jobs import CONCURRENCY, FLOW_QUEUE, ONE_THREAD_QUEUE, RATE_CALLS, RATE_PERIOD
from tests.support import migrated_pg_database, wait_for

JOB_MODULES = "tests.jobs,tests.flow_jobs"


@pytest.fixture(scope="module")
def flow_database() -> Iterator[str]:
    with migrated_pg_database("jobyard_test_flow_dramatiq") as url:
        yield url


@pytest.fixture
def flow(
    engines: Engines, flow_database: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Engines]:
    """`engines` with the flow jobs loaded, here and in every worker started after this, and
    the permit store (and job log) in PostgreSQL."""
    monkeypatch.setenv(env.JOB_MODULES, JOB_MODULES)
    monkeypatch.setenv(env.DATABASE_URL, flow_database)
    runtime.reset()
    load_job_modules()
    yield engines
    runtime.reset()
    dispose_store_engines()
    dispose_engines()


@dataclass(frozen=True)
class Run:
    granted: float  # the permit store's clock
    start: float  # this host's clock, from here on
    end: float
    key: str
    label: str
    attempt: int


def runs(directory: Path) -> list[Run]:
    path = directory / "runs"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        granted, start, end, key, label, attempt = line.split()
        found.append(Run(float(granted), float(start), float(end), key, label, int(attempt)))
    return found


def by_key(found: list[Run]) -> dict[str, list[Run]]:
    grouped: dict[str, list[Run]] = defaultdict(list)
    for run in found:
        grouped[run.key].append(run)
    return grouped


def most_in_a_window(stamps: list[float], period: float) -> int:
    """The most stamps any window [t, t + period) holds (ms resolution, as the store's)."""
    ordered = sorted(round(s * 1000) for s in stamps)
    width = round(period * 1000)
    most, first = 0, 0
    for last, stamp in enumerate(ordered):
        while stamp - ordered[first] >= width:
            first += 1
        most = max(most, last - first + 1)
    return most


def most_at_once(found: list[Run]) -> int:
    edges = sorted([(r.start, 1) for r in found] + [(r.end, -1) for r in found])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def tenant(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def test_rate_limit_per_key_is_never_exceeded_in_any_window(flow: Engines, tmp_path: Path) -> None:
    flow.start_worker(queues=FLOW_QUEUE, processes=2)
    busy, quiet = tenant("busy"), tenant("quiet")
    requests = [("test.flow_rate", {"marker_dir": str(tmp_path), "tenant": busy})] * 12
    requests += [("test.flow_rate", {"marker_dir": str(tmp_path), "tenant": quiet})] * 4
    began = time.time()
    handles = dispatch_many(requests)
    assert all(not isinstance(h, Exception) and h.engine == "dramatiq" for h in handles)
    wait_for(lambda: len(runs(tmp_path)) == 16, timeout=90)
    grouped = by_key(runs(tmp_path))
    for key, found in grouped.items():
        stamps = [r.granted for r in found]
        assert most_in_a_window(stamps, RATE_PERIOD) <= RATE_CALLS, (key, sorted(stamps))
    busy_stamps = sorted(r.granted for r in grouped[busy])
    # The limit did hold jobs back: 12 starts at 3 a second span at least 3 periods.
    assert busy_stamps[-1] - busy_stamps[0] >= 3 * RATE_PERIOD - 0.01
    # Held jobs spent no attempt (each ran once, as its first), and the quiet tenant's jobs
    # were not stuck behind the busy one's held jobs.
    assert {r.attempt for r in runs(tmp_path)} == {1}
    assert max(r.granted for r in grouped[quiet]) < busy_stamps[-1]
    for handle in handles:
        assert not isinstance(handle, Exception)
        assert flow.wait(handle.job_id, timeout=30).attempts == 1
    print(f"rate: 16 jobs in {time.time() - began:.1f}s; busy tenant over "
          f"{busy_stamps[-1] - busy_stamps[0]:.2f}s")  # fmt: skip


def test_concurrency_per_key_is_never_exceeded_and_small_keys_are_not_stuck(
    flow: Engines, tmp_path: Path
) -> None:
    flow.start_worker(queues=FLOW_QUEUE, processes=2)  # 8 threads in all
    big = tenant("big")
    smalls = [tenant(f"small{i}") for i in range(4)]

    def job(key: str, label: str) -> tuple[str, dict[str, object]]:
        payload = {"marker_dir": str(tmp_path), "tenant": key, "label": label, "seconds": 0.3}
        return ("test.flow_slots", payload)

    handles = dispatch_many([job(big, f"b{i}") for i in range(30)])
    handles += dispatch_many([job(key, f"s{i}") for key in smalls for i in range(3)])
    assert all(not isinstance(h, Exception) and h.engine == "dramatiq" for h in handles)
    wait_for(lambda: len(runs(tmp_path)) == 42, timeout=120)
    grouped = by_key(runs(tmp_path))
    for key, found in grouped.items():
        assert most_at_once(found) <= CONCURRENCY, key
    assert most_at_once(grouped[big]) == CONCURRENCY  # the limit was reached, not idle
    big_starts = sorted(r.start for r in grouped[big])
    small_ends = [r.end for key in smalls for r in grouped[key]]
    # Every small key's jobs were done before the big key was a third through its 30.
    assert max(small_ends) < big_starts[10], (max(small_ends), big_starts)
    assert {r.attempt for r in runs(tmp_path)} == {1}


def test_a_debounced_burst_runs_once_with_its_last_payload(flow: Engines, tmp_path: Path) -> None:
    flow.start_worker(queues=FLOW_QUEUE)
    doc, other = tenant("doc"), tenant("other")
    handles = []
    for value in range(1, 6):
        handles.append(
            dispatch_job(
                "test.flow_debounce", {"marker_dir": str(tmp_path), "doc": doc, "value": value}
            )
        )
        time.sleep(0.1)
    others = [
        dispatch_job(
            "test.flow_debounce", {"marker_dir": str(tmp_path), "doc": other, "value": value}
        )
        for value in (7, 8)
    ]
    run_id = handles[0].job_id
    assert handles[0].served_by is None
    assert [h.served_by for h in handles[1:]] == [run_id] * 4
    assert get_job(run_id).display_state == "debouncing"
    wait_for(lambda: len(runs(tmp_path)) == 2, timeout=60)
    time.sleep(2.0)  # a second run would come within a period: none does
    found = {r.key: r for r in runs(tmp_path)}
    assert len(runs(tmp_path)) == 2
    assert found[doc].label == "5" and found[other].label == "8"
    assert flow.wait(run_id).state == "succeeded"
    collapsed = get_job(handles[3].job_id)
    assert (collapsed.job_id, collapsed.state, collapsed.display_state, collapsed.served_by) == (
        handles[3].job_id, "succeeded", "collapsed", run_id,
    )  # fmt: skip
    assert get_job(others[1].job_id).served_by == others[0].job_id


def test_a_held_job_holds_no_worker_thread_and_spends_no_attempt(
    flow: Engines, tmp_path: Path
) -> None:
    flow.start_worker(queues=ONE_THREAD_QUEUE)  # one process, one thread
    key = tenant("one")

    def payload(label: str, seconds: float = 0.0) -> dict[str, object]:
        return {"marker_dir": str(tmp_path), "tenant": key, "label": label, "seconds": seconds}

    first = dispatch_job("test.flow_one_slot", payload("a1", 1.5))
    held = [dispatch_job("test.flow_one_slot", payload(f"a{i}", 0.2)) for i in (2, 3)]
    wait_for(lambda: get_job(first.job_id).state == "running", timeout=30)
    free = dispatch_job("test.flow_free", payload("free"))
    status = get_job(held[1].job_id)
    assert (status.state, status.display_state) == ("queued", "waiting for slot")
    assert status.waiting_reason is not None and f"tenant={key}" in status.waiting_reason
    assert "concurrency:job:test.flow_one_slot (1 at once)" in status.waiting_reason
    client = flow.redis.client()
    assert client.zcard(keys.parked(ONE_THREAD_QUEUE)) == 2  # parked, not in a thread
    client.close()
    for handle in (first, *held, free):
        assert flow.wait(handle.job_id, timeout=60).attempts == 1
    order = [r.label for r in sorted(runs(tmp_path), key=lambda r: r.start)]
    # The free job, dispatched last, ran on the only thread while a2 and a3 waited.
    assert order[:2] == ["a1", "free"], order
    assert most_at_once([r for r in runs(tmp_path) if r.label != "free"]) == 1
    assert get_job(held[1].job_id).display_state is None  # no longer held once it ran


@pytest.mark.parametrize(
    ("payload", "reason"),
    [({}, "flow-control key 'tenant': the value is null"), ({"tenant": None}, "is null")],
)
def test_a_payload_without_its_key_is_refused_at_dispatch(
    flow: Engines, tmp_path: Path, payload: dict[str, object], reason: str
) -> None:
    with pytest.raises(MissingKeyError, match=reason):
        dispatch_job("test.flow_maybe_keyed", {"marker_dir": str(tmp_path), **payload})
    client = flow.redis.client()
    assert client.keys(f"{keys.job_prefix()}*") == []  # nothing started
    client.close()


def test_dispatch_lets_at_most_the_limit_per_key_into_the_ready_list(
    flow: Engines, tmp_path: Path
) -> None:
    """The rest wait parked, one by one or in bulk: a big key's backlog is never in front of a
    small key's job (no worker here: a live one is pretended, so the jobs stay queued)."""
    client = flow.redis.client()
    seconds, _ = client.time()
    client.zadd(keys.workers(FLOW_QUEUE), {"placeholder": (seconds + 600) * 1000})
    big, small = tenant("big"), tenant("small")

    def job(key: str) -> tuple[str, dict[str, object]]:
        return ("test.flow_slots", {"marker_dir": str(tmp_path), "tenant": key})

    assert all(not isinstance(h, Exception) for h in dispatch_many([job(big)] * 20))
    dispatch_job(*job(big))
    assert all(not isinstance(h, Exception) for h in dispatch_many([job(small)] * 3))
    assert client.llen(keys.dramatiq_queue(FLOW_QUEUE)) == 2 * CONCURRENCY
    assert client.zcard(keys.parked(FLOW_QUEUE)) == 21 + 3 - 2 * CONCURRENCY
    client.close()


def test_a_run_whose_permit_store_is_away_waits_instead_of_running_unlimited(
    flow: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobyard.job_engine import get_spec
    from jobyard.queue.flow import STORE_AWAY_SECONDS, Held, RunPermits
    from jobyard.queue.store import JobStore

    monkeypatch.setenv(env.DATABASE_URL, "postgresql+psycopg://nobody@127.0.0.1:1/nothing")
    runtime.reset()
    spec = get_spec("test.flow_slots")
    permits = RunPermits(
        JobStore(flow.redis.client()), spec, "job-x", {"tenant": "t"}, resume=False
    )
    with pytest.raises(Held) as held:
        permits.acquire()
    assert (held.value.seconds, held.value.hold) == (STORE_AWAY_SECONDS, None)

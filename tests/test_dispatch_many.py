"""dispatch_many(): many jobs in batches, with dispatch_job's checks and guarantees per job."""

from __future__ import annotations

import asyncio
import gc
import json
import uuid

from jobyard.dispatcher import (
    DispatchRequest,
    IdempotencyConflictError,
    JobHandle,
    adispatch_many,
    dispatch_job,
    dispatch_many,
    get_dispatcher,
    get_job,
)
from jobyard.dispatcher.engines.dramatiq.engine import BATCH_JOBS
from jobyard.job_engine import InvalidPayloadError, RetryPolicy, UnknownJobError
from jobyard.job_engine.db import joblog
from jobyard.queue import keys
from jobyard.queue.client import get_client
from jobyard.queue.store import JobStore
from tests.engines import Engines
from tests.support import RedisServer


def echo_requests(count: int, tag: str) -> list[tuple[str, dict[str, object]]]:
    return [("system.echo", {"tag": tag, "n": n}) for n in range(count)]


def evalsha_calls(redis_server: RedisServer) -> int:
    client = redis_server.client()
    try:
        return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    finally:
        client.close()


def test_jobs_run_in_order_and_bad_ones_get_their_own_error(shared_engines: Engines) -> None:
    shared_engines.ensure_worker()
    requests: list[DispatchRequest | tuple[str, object]] = [*echo_requests(30, "run")]
    requests.insert(3, ("no.such.job", {}))
    requests.insert(10, DispatchRequest("system.echo", {"n": 1}, job_id="bad id with spaces"))
    requests.insert(20, ("test.two_steps", {"sleep": "not a number"}))

    results = dispatch_many(requests)

    assert len(results) == 33
    assert isinstance(results[3], UnknownJobError)
    assert isinstance(results[10], ValueError) and "invalid job_id" in str(results[10])
    assert isinstance(results[20], InvalidPayloadError)
    handles = [r for r in results if isinstance(r, JobHandle)]
    assert len(handles) == 30 and {h.engine for h in handles} == {"dramatiq"}
    for handle, (_, payload) in zip(handles, echo_requests(30, "run"), strict=True):
        status = shared_engines.wait(handle.job_id)
        assert (status.state, status.result) == ("succeeded", payload)


def test_one_lua_call_per_batch(engines: Engines) -> None:
    """A live worker's heartbeat, no worker: nothing else calls Redis while the batch goes in."""
    store = JobStore(get_client())
    store.heartbeat("test-worker", "test-broker", ["default"])
    count = BATCH_JOBS * 2 + 7
    before = evalsha_calls(engines.redis)
    results = dispatch_many(echo_requests(count, "calls"))
    assert evalsha_calls(engines.redis) - before == 3
    assert all(isinstance(r, JobHandle) and r.engine == "dramatiq" for r in results)
    assert engines.redis.client().llen("dramatiq:default") == count
    assert len({r.job_id for r in results if isinstance(r, JobHandle)}) == count


def test_caller_chosen_ids_start_once(shared_engines: Engines) -> None:
    shared_engines.ensure_worker()
    tag = uuid.uuid4().hex[:8]  # the job id registry outlives one test
    taken = dispatch_job("system.echo", {"n": "first"}, job_id=f"{tag}-taken")
    requests = [
        DispatchRequest("system.echo", {"n": 1}, job_id=f"{tag}-a"),
        DispatchRequest("system.echo", {"n": 2}, job_id=f"{tag}-b"),
        DispatchRequest("system.echo", {"n": 1}, job_id=f"{tag}-a"),  # the same job twice
        DispatchRequest("system.echo", {"n": "other"}, job_id=f"{tag}-taken"),
        DispatchRequest("system.echo", {"n": "first"}, job_id=f"{tag}-taken"),
    ]
    first = dispatch_many(requests)
    assert [(r.job_id, r.duplicate) for r in first if isinstance(r, JobHandle)] == [
        (f"{tag}-a", False),
        (f"{tag}-b", False),
        (f"{tag}-a", True),
        (f"{tag}-taken", True),
    ]
    assert isinstance(first[3], IdempotencyConflictError)
    again = dispatch_many(requests)
    assert [r.duplicate for r in again if isinstance(r, JobHandle)] == [True] * 4
    for job_id in (f"{tag}-a", f"{tag}-b", taken.job_id):
        assert shared_engines.wait(job_id).state == "succeeded"
    assert shared_engines.wait(f"{tag}-a").attempts == 1


def test_no_live_worker_sends_each_job_to_temporal(engines: Engines) -> None:
    engines.start_temporal_worker()
    results = dispatch_many(echo_requests(5, "temporal"))
    assert {(r.engine, r.fallback_reason) for r in results if isinstance(r, JobHandle)} == {
        ("temporal", "no_live_workers")
    }
    for result in results:
        assert isinstance(result, JobHandle)
        assert engines.wait(result.job_id).state == "succeeded"


def test_redis_down_sends_each_job_to_temporal(engines: Engines) -> None:
    engines.start_temporal_worker()
    get_dispatcher()  # built while Redis answers, as in a running web app
    engines.redis.kill()
    results = dispatch_many(echo_requests(4, "down"))
    assert all(isinstance(r, JobHandle) for r in results), results
    reasons = {(r.engine, r.fallback_reason) for r in results if isinstance(r, JobHandle)}
    assert reasons <= {("temporal", "redis_error"), ("temporal", "redis_unhealthy")}
    for result in results:
        assert isinstance(result, JobHandle)
        assert engines.wait(result.job_id).state == "succeeded"


def test_adispatch_many(shared_engines: Engines) -> None:
    shared_engines.ensure_worker()
    results = asyncio.run(adispatch_many(echo_requests(3, "async")))
    for result in results:
        assert isinstance(result, JobHandle)
        assert shared_engines.wait(result.job_id).state == "succeeded"


def test_options_travel_with_each_job(shared_engines: Engines) -> None:
    """A delayed job waits on its queue's delay queue; a retry override reaches its record."""
    shared_engines.ensure_worker()
    results = dispatch_many(
        [
            DispatchRequest("system.echo", {"n": "later"}, delay=2),
            DispatchRequest("system.echo", {"n": "now"}, retry=RetryPolicy(attempts=2)),
        ]
    )
    later, now = results
    assert isinstance(later, JobHandle) and isinstance(now, JobHandle)
    assert shared_engines.wait(now.job_id).state == "succeeded"
    assert get_job(later.job_id).state == "queued"  # still waiting out its delay
    client = shared_engines.redis.client()
    options = json.loads(client.hget(keys.job(now.job_id), "options"))
    assert options == {"retry": RetryPolicy(attempts=2).overrides()}
    assert shared_engines.wait(later.job_id, timeout=30).state == "succeeded"


def test_a_refused_batch_stops_the_ones_after_it(engines: Engines) -> None:
    """Redis refuses the second batch (out of memory, an error reply: it ran nothing): the first
    batch stays on Dramatiq, every later job goes to Temporal with the same guarantees as a
    single dispatch, and nothing is queued twice."""
    client = engines.redis.client()
    JobStore(client).heartbeat("test-worker", "test-broker", ["default"])
    requests = echo_requests(BATCH_JOBS * 3, "oom")
    before = int(client.info("memory")["used_memory"])
    dispatch_many(requests[:BATCH_JOBS])  # what one batch adds to Redis's memory
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + (used - before))  # the next batch passes it
    try:
        results = dispatch_many(requests)
    finally:
        client.config_set("maxmemory", 0)
    engines_used = [r.engine if isinstance(r, JobHandle) else type(r).__name__ for r in results]
    assert engines_used[:BATCH_JOBS] == ["dramatiq"] * BATCH_JOBS
    assert set(engines_used[BATCH_JOBS:]) == {"temporal"}
    assert client.llen("dramatiq:default") == 2 * BATCH_JOBS


def test_the_garbage_collector_is_paused_only_while_the_batch_runs(
    engines: Engines, monkeypatch
) -> None:
    """Paused during the call (each job's objects would have it traverse the heap again and
    again), on again after it, and left off when the caller had switched it off."""
    JobStore(get_client()).heartbeat("test-worker", "test-broker", ["default"])
    dramatiq = get_dispatcher().dramatiq
    submit_many = dramatiq.submit_many
    seen: list[bool] = []

    def watched(jobs):
        seen.append(gc.isenabled())
        return submit_many(jobs)

    monkeypatch.setattr(dramatiq, "submit_many", watched)
    assert gc.isenabled()
    results = dispatch_many([*echo_requests(3, "gc"), ("no.such.job", {})])
    assert isinstance(results[3], UnknownJobError)
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        dispatch_many(echo_requests(3, "gc-off"))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_jobs_redis_lost_after_dispatch_many_are_dispatched_again_from_the_job_log(
    engines: Engines, redis_server: RedisServer
) -> None:
    """The batch's "queued" rows (written by the job log's one-statement path) are how the
    rescue finds jobs a Redis that restarted empty lost: each runs once, under its id."""
    JobStore(get_client()).heartbeat("test-worker", "test-broker", ["default"])
    results = dispatch_many(echo_requests(40, "lost"))
    assert all(isinstance(r, JobHandle) and r.engine == "dramatiq" for r in results)
    writer = joblog.writer()
    assert writer is not None
    writer.flush()
    redis_server.kill()
    redis_server.start()  # no persistence: it comes back empty
    engines.start_worker()
    engines.start_temporal_worker()  # runs the rescue
    for result, (_, payload) in zip(results, echo_requests(40, "lost"), strict=True):
        assert isinstance(result, JobHandle)
        status = engines.wait(result.job_id, timeout=120)
        assert (status.state, status.result, status.attempts) == ("succeeded", payload, 1)

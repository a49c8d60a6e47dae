"""Temporal fallback throughput: system.echo jobs completed per second through
`jobyard temporal-worker`, next to the Dramatiq path measured in the same run."""

from __future__ import annotations

import argparse
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from _common import Proc, RedisServer, TemporalDevServer, set_env, wait_for


def complete_all(engine: str, job_ids: list[str], timeout: float = 600) -> None:
    """Waits until every job succeeded, polling cheaply so the poll does not load the engine."""
    from jobyard.dispatcher import get_dispatcher, get_job

    deadline = time.monotonic() + timeout
    if engine == "temporal":
        temporal = get_dispatcher().temporal
        query = f"TaskQueue = '{temporal.task_queue}' AND ExecutionStatus = 'Running'"

        async def running() -> int:
            client = await temporal.client()
            return (await client.count_workflows(query)).count

        while temporal.run(running()) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError("Temporal jobs unfinished")
            time.sleep(0.1)
    pending = list(job_ids)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} jobs unfinished")
        pending = [j for j in pending if get_job(j).state != "succeeded"]
        if pending:
            time.sleep(0.1)
    return None


def run(n: int, engine: str) -> float:
    from jobyard.dispatcher import dispatch_job

    os.environ["USE_DRAMATIQ"] = "false" if engine == "temporal" else "true"
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:  # web servers dispatch concurrently
        handles = list(pool.map(lambda i: dispatch_job("system.echo", {"n": i}), range(n)))
    assert {h.engine for h in handles} == {engine}
    print(f"  {engine}: {n} dispatched in {time.perf_counter() - started:.2f}s")
    complete_all(engine, [h.job_id for h in handles][-20:])
    return n / (time.perf_counter() - started)


def main(n: int = 500) -> dict[str, float]:
    redis_server = RedisServer().start()
    temporal = TemporalDevServer().start()
    procs: list[Proc] = []
    try:
        set_env(
            REDIS_URL=redis_server.url,
            TEMPORAL_ADDRESS=temporal.address,
            TEMPORAL_TASK_QUEUE=f"bench-{uuid.uuid4().hex[:8]}",
        )
        procs.append(Proc(["temporal-worker"], dict(os.environ)))
        wait_for(lambda: "Temporal worker polling" in procs[0].output(), timeout=60)
        procs.append(Proc(["worker", "--queues", "default", "--processes", "1"], dict(os.environ)))
        from jobyard.dispatcher import warm_up
        from jobyard.queue.client import get_client
        from jobyard.queue.store import JobStore

        warm_up()
        store = JobStore(get_client())
        wait_for(lambda: store.live_workers("default", 10_000) > 0, timeout=60)
        temporal_rate = run(n, "temporal")
        dramatiq_rate = run(n, "dramatiq")
        print(f"{n} system.echo jobs each, dispatched from 8 threads, until all succeeded")
        print(f"Temporal fallback: {temporal_rate:7.1f} jobs/s completed")
        print(f"Dramatiq path:     {dramatiq_rate:7.1f} jobs/s completed (same run, 1 process)")
        print(f"fallback / primary = {temporal_rate / dramatiq_rate:.2f}x")
        return {"temporal_jobs_per_s": temporal_rate, "dramatiq_jobs_per_s": dramatiq_rate}
    finally:
        for proc in procs:
            proc.stop()
        redis_server.stop()
        temporal.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=500)
    main(parser.parse_args().n)

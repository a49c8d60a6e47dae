"""Temporal fallback throughput: system.echo jobs completed per second through
`jobyard temporal-worker`, against a bare Temporal worker (one workflow, one activity, the SDK's
defaults, one process) on the same dev server, and next to the Dramatiq path, all in the same run.

Target (issue 16): the fallback at least 1.0x the bare one-activity workflow.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import (
    ROOT,
    Proc,
    RedisServer,
    TemporalDevServer,
    fresh_database,
    set_env,
    wait_for,
)

CONCURRENT_STARTS = 8  # as many starts in flight as the 8 dispatching threads below


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


def run_bare(n: int, address: str) -> float:
    """n bare workflows started CONCURRENT_STARTS at a time, until every one has completed."""
    from temporalio.client import Client

    task_queue = f"bare-{uuid.uuid4().hex[:8]}"
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "_bare_temporal_worker.py"), address, task_queue],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None and "polling" in worker.stdout.readline()

        async def start_all() -> float:
            client = await Client.connect(address)
            gate = asyncio.Semaphore(CONCURRENT_STARTS)

            async def start(i: int) -> Any:
                async with gate:
                    return await client.start_workflow(
                        "bare.echo", {"n": i}, id=f"bare-{task_queue}-{i}", task_queue=task_queue
                    )

            started = time.perf_counter()
            handles = await asyncio.gather(*(start(i) for i in range(n)))
            print(f"  bare temporal: {n} started in {time.perf_counter() - started:.2f}s")
            for handle in handles[-20:]:
                await handle.result()
            query = f"TaskQueue = '{task_queue}' AND ExecutionStatus = 'Running'"
            while (await client.count_workflows(query)).count > 0:
                await asyncio.sleep(0.1)
            return n / (time.perf_counter() - started)

        return asyncio.run(start_all())
    finally:
        worker.terminate()
        worker.wait(30)


def main(n: int = 500) -> dict[str, float]:
    with fresh_database() as database_url:
        return _main(n, database_url)


def _main(n: int, database_url: str) -> dict[str, float]:
    redis_server = RedisServer().start()
    temporal = TemporalDevServer().start()
    procs: list[Proc] = []
    try:
        set_env(
            REDIS_URL=redis_server.url,
            TEMPORAL_ADDRESS=temporal.address,
            TEMPORAL_TASK_QUEUE=f"bench-{uuid.uuid4().hex[:8]}",
            DATABASE_URL=database_url,
            JOBYARD_JOB_LOG="true",
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
        bare_rate = run_bare(n, temporal.address)
        temporal_rate = run(n, "temporal")
        dramatiq_rate = run(n, "dramatiq")
        print(f"{n} jobs each, {CONCURRENT_STARTS} dispatches in flight, until all succeeded")
        print(f"bare Temporal (1 activity): {bare_rate:7.1f} workflows/s completed")
        print(f"Temporal fallback:          {temporal_rate:7.1f} jobs/s completed")
        print(f"Dramatiq path:              {dramatiq_rate:7.1f} jobs/s completed (1 process)")
        print(f"fallback / bare Temporal = {temporal_rate / bare_rate:.2f}x   (target >= 1.0x)")
        print(f"fallback / primary = {temporal_rate / dramatiq_rate:.2f}x")
        return {
            "fallback_vs_bare_temporal": temporal_rate / bare_rate,
            "temporal_jobs_per_s": temporal_rate,
            "dramatiq_jobs_per_s": dramatiq_rate,
        }
    finally:
        for proc in procs:
            proc.stop()
        redis_server.stop()
        temporal.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=500)
    main(parser.parse_args().n)

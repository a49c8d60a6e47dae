"""dispatch_job() latency against bare Dramatiq `actor.send()`, same Redis, same run.

Target (issue 16): dispatch_job p50 at most 1.1x bare send().
"""

from __future__ import annotations

import argparse
import time
import uuid

from _common import RedisServer, fresh_database, pct, set_env, summary_us


def measure(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main(n: int = 5000, rounds: int = 5) -> dict[str, float]:
    with fresh_database() as database_url:
        return _main(n, rounds, database_url)


def _main(n: int, rounds: int, database_url: str) -> dict[str, float]:
    redis_server = RedisServer().start()
    try:
        set_env(
            REDIS_URL=redis_server.url, USE_DRAMATIQ="true", DATABASE_URL=database_url,
            JOBYARD_JOB_LOG="true",
        )  # fmt: skip
        import dramatiq
        from dramatiq.brokers.redis import RedisBroker

        from jobyard.dispatcher import dispatch_job, warm_up
        from jobyard.queue.client import get_client
        from jobyard.queue.store import JobStore

        warm_up()
        store = JobStore(get_client())
        bench_worker = f"bench:{uuid.uuid4().hex[:6]}"

        broker = RedisBroker(url=redis_server.url, namespace="bare")

        @dramatiq.actor(broker=broker, queue_name="default", actor_name="noop")
        def noop(payload):
            return None

        payload = {"hello": "world", "n": 1}
        jobyard_times: list[float] = []
        bare_times: list[float] = []
        for _ in range(rounds):  # interleaved, so drift on a noisy machine hits both alike
            store.heartbeat(bench_worker, "bench-broker", ["default"])  # one live worker
            bare_times += measure(lambda: noop.send(payload), n // rounds)
            jobyard_times += measure(lambda: dispatch_job("system.echo", payload), n // rounds)
        ratio = pct(jobyard_times, 50) / pct(bare_times, 50)
        print(f"bare dramatiq send(): {summary_us(bare_times)}")
        print(f"jobyard dispatch_job: {summary_us(jobyard_times)}   (job log on)")
        print(f"dispatch_job p50 / send() p50 = {ratio:.2f}x   (target <= 1.1x)")
        return {"dispatch_p50_ratio": ratio}
    finally:
        redis_server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5000)
    main(parser.parse_args().n)

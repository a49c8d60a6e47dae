"""dispatch_job() latency while Redis is paused (SIGSTOP), against bare Dramatiq send().

Targets: the first call under 300 ms, p99 of the later calls under 50 ms. Bare Dramatiq with
redis-py's defaults blocks for seconds per call here; it is measured once, capped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
import uuid

from _common import RedisServer, TemporalDevServer, pct, set_env, summary_us

BARE_CAP_SECONDS = 15.0


def bare_send_seconds(url: str) -> float:
    """How long one bare Dramatiq send() blocks on the paused Redis (capped)."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url, namespace="bare")

    @dramatiq.actor(broker=broker, actor_name="noop_paused")
    def noop():
        return None

    done = threading.Event()
    started = time.perf_counter()
    elapsed: list[float] = []

    def send() -> None:
        with contextlib.suppress(Exception):
            noop.send()
        elapsed.append(time.perf_counter() - started)
        done.set()

    threading.Thread(target=send, daemon=True).start()
    done.wait(BARE_CAP_SECONDS)
    return elapsed[0] if elapsed else BARE_CAP_SECONDS


def main(n: int = 500) -> dict[str, float]:
    redis_server = RedisServer().start()
    temporal = TemporalDevServer().start()
    try:
        set_env(
            REDIS_URL=redis_server.url,
            TEMPORAL_ADDRESS=temporal.address,
            TEMPORAL_TASK_QUEUE=f"bench-{uuid.uuid4().hex[:8]}",
            USE_DRAMATIQ="true",
            JOBYARD_BREAKER_PROBE_INTERVAL="0.5",
        )
        from jobyard.dispatcher import dispatch_job, warm_up
        from jobyard.queue.client import get_client
        from jobyard.queue.store import JobStore

        warm_up()
        JobStore(get_client()).heartbeat("bench:w", "bench", ["default"])
        assert dispatch_job("system.echo", {}).engine == "dramatiq"

        redis_server.pause()
        started = time.perf_counter()
        first = dispatch_job("system.echo", {"n": 0})
        first_seconds = time.perf_counter() - started
        later = []
        for i in range(n):
            t = time.perf_counter()
            handle = dispatch_job("system.echo", {"n": i})
            later.append(time.perf_counter() - t)
            assert handle.engine == "temporal"
        bare = bare_send_seconds(redis_server.url)
        redis_server.resume()

        timeout = os.environ.get("REDIS_TIMEOUT", "0.2")
        print(f"Redis timeout {timeout} s; the first call went to {first.engine}")
        print(f"first call on paused Redis: {first_seconds * 1000:7.1f} ms   (target < 300 ms)")
        print(f"next {n} calls: {summary_us(later)}   (target p99 < 50 ms)")
        print(f"bare dramatiq send() blocked: {bare:7.2f} s (capped at {BARE_CAP_SECONDS:.0f} s)")
        return {"paused_first_ms": first_seconds * 1000, "paused_p99_ms": pct(later, 99) * 1000}
    finally:
        redis_server.stop()
        temporal.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=500)
    main(parser.parse_args().n)

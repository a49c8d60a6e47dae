"""Redis memory per waiting job, for sizing (docs/deploying.md, "Sizing"): `dispatch_many` of N
`system.echo` jobs to a queue whose only worker is a heartbeat (nothing takes them), with the
job log off (it costs PostgreSQL, not Redis, once shipped), on a fresh redis-server.

    uv run python bench/bench_waiting_memory.py -n 100000
"""

from __future__ import annotations

import argparse
import time

from _common import RedisServer, free_port, set_env

CHUNK = 10_000  # jobs per dispatch_many; the heartbeat is renewed between chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=100_000, help="jobs left waiting")
    count = parser.parse_args().n
    server = RedisServer().start()
    try:
        set_env(
            REDIS_URL=server.url, REDIS_TIMEOUT="5", USE_DRAMATIQ="true", JOBYARD_JOB_LOG="false",
            TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}",  # unused: every job goes to Dramatiq
        )  # fmt: skip
        measure(server, count)
    finally:
        server.stop()


def measure(server: RedisServer, count: int) -> None:
    from jobyard.dispatcher import dispatch_many
    from jobyard.queue.client import get_client
    from jobyard.queue.store import JobStore

    store, client = JobStore(get_client()), server.client()
    store.heartbeat("sizing-worker", "sizing-broker", ["default"])
    dispatch_many([("system.echo", {"n": -1})])  # the script loaded, the dispatcher built
    before = client.info("memory")["used_memory"]
    started = time.perf_counter()
    for first in range(0, count, CHUNK):
        store.heartbeat("sizing-worker", "sizing-broker", ["default"])
        payloads = [("system.echo", {"n": i, "to": "someone@example.com"})
                    for i in range(first, min(count, first + CHUNK))]  # fmt: skip
        for result in dispatch_many(payloads):
            if isinstance(result, Exception) or result.engine != "dramatiq":
                raise SystemExit(f"not left waiting on Dramatiq: {result}")
    took = time.perf_counter() - started
    after = client.info("memory")["used_memory"]
    print(
        f"{count} waiting jobs: {(after - before) / count:.0f} bytes each in Redis "
        f"(used_memory {before} -> {after}); dispatch_many {count / took:.0f} jobs/s"
    )


if __name__ == "__main__":
    main()

"""Encryption at rest (issue 33) on against off, in the same run: dispatch_job's latency and the
throughput of a job with one step, through a real `jobyard worker` and the PostgreSQL job log.

Both measures take turns so that the machine's drift (shared cores) hits both alike:

* latency: rounds of `dispatch_job` (a ~1 KB payload, job log on, a fake live worker so every
  job goes to Dramatiq), alternately with JOBYARD_ENCRYPTION_KEYS unset and set, in this
  process (the key ring is read again between rounds);
* throughput: two workers, one per setting, each with its own Redis; in each round one of them
  drains a batch of `bench.step` jobs (one recorded step returning the payload: the payload,
  the step's result and the job's result are sealed), then the other.

    python bench/bench_encryption.py [-n 2000] [--jobs 1000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from typing import Any

from _common import ROOT, Proc, RedisServer, fresh_database, pct, set_env, summary_us, wait_for
from _workload import _ORDER

from jobyard.queue import keys

KEYS = "bench:" + __import__("base64").b64encode(os.urandom(32)).decode()
PAYLOAD = {"seg": "enc", "i": 0, "t": 0.0, "order": _ORDER}


def encryption(on: bool) -> None:
    from jobyard.job_engine import crypto

    if on:
        os.environ["JOBYARD_ENCRYPTION_KEYS"] = KEYS
    else:
        os.environ.pop("JOBYARD_ENCRYPTION_KEYS", None)
    crypto.reset()


def latency(n: int, rounds: int) -> dict[str, list[float]]:
    from jobyard.dispatcher import dispatch_job
    from jobyard.queue.client import get_client
    from jobyard.queue.store import JobStore

    store = JobStore(get_client())
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for label in ("off", "on"):
            encryption(label == "on")
            store.heartbeat(f"bench:{uuid.uuid4().hex[:6]}", "bench-broker", ["default"])
            for _ in range(n // rounds):
                began = time.perf_counter()
                dispatch_job("bench.step", PAYLOAD)
                times[label].append(time.perf_counter() - began)
    encryption(False)
    return times


class Contender:
    """A `jobyard worker` on its own Redis, with or without the keys."""

    def __init__(self, label: str, database_url: str) -> None:
        self.label = label
        self.redis = RedisServer().start()
        self.env = {
            **os.environ, "REDIS_URL": self.redis.url, "DATABASE_URL": database_url,
            "JOBYARD_JOB_MODULES": "_bench_jobs", "PYTHONPATH": f"{ROOT}/bench:{ROOT}",
            "WORKER_CONCURRENCY_DEFAULT": "8", "JOBYARD_SCHEDULER": "false",
            "JOBYARD_DISPATCH_RELAY": "false", "WORKER_METRICS_PORT": "0",
        }  # fmt: skip
        self.env.pop("JOBYARD_ENCRYPTION_KEYS", None)
        if label == "on":
            self.env["JOBYARD_ENCRYPTION_KEYS"] = KEYS
        self.worker = Proc(["worker", "--queues", "default", "--processes", "1"], self.env)
        client = self.redis.client()
        wait_for(lambda: client.zcard(keys.workers("default")) > 0, timeout=120)
        client.close()

    def drain(self, jobs: int) -> float:
        """Seconds from the first dispatch until `jobs` jobs have succeeded."""
        set_env(REDIS_URL=self.redis.url)
        encryption(self.label == "on")
        from jobyard.dispatcher import dispatch_many
        from jobyard.dispatcher.models import DispatchRequest

        client = self.redis.client()
        began = time.perf_counter()
        dispatch_many([DispatchRequest("bench.step", PAYLOAD) for _ in range(jobs)])
        wait_for(lambda: _messages_left(client) == 0, timeout=600, interval=0.02)
        elapsed = time.perf_counter() - began
        client.close()
        return elapsed

    def stop(self) -> None:
        self.worker.stop(timeout=10)
        self.redis.stop()


def _messages_left(client: Any) -> int:
    """Messages not acked yet: a finished job's message data is deleted with its ack."""
    return int(client.hlen(keys.dramatiq_messages("default")))


def main(n: int = 2000, jobs: int = 1000, rounds: int = 4) -> dict[str, float]:
    with fresh_database() as database_url:
        redis_server = RedisServer().start()
        try:
            set_env(
                REDIS_URL=redis_server.url, USE_DRAMATIQ="true", DATABASE_URL=database_url,
                JOBYARD_JOB_LOG="true", JOBYARD_JOB_MODULES="_bench_jobs",
            )  # fmt: skip
            from jobyard.dispatcher import warm_up

            warm_up()
            times = latency(n, rounds)
        finally:
            redis_server.stop()
        print(f"dispatch_job, encryption off: {summary_us(times['off'])}")
        print(f"dispatch_job, encryption on:  {summary_us(times['on'])}")
        ratio = pct(times["on"], 50) / pct(times["off"], 50)
        print(f"dispatch p50 on / off = {ratio:.2f}x")

        contenders = [Contender("off", database_url), Contender("on", database_url)]
        seconds = {"off": 0.0, "on": 0.0}
        try:
            for contender in contenders:
                contender.drain(50)  # both warmed up: imports, connections, first jobs
            for _ in range(rounds):
                for contender in contenders:
                    seconds[contender.label] += contender.drain(jobs // rounds)
        finally:
            for contender in contenders:
                contender.stop()
        rates = {label: (jobs // rounds) * rounds / spent for label, spent in seconds.items()}
        print(f"bench.step throughput: off {rates['off']:.0f} jobs/s, on {rates['on']:.0f} jobs/s")
        print(f"throughput on / off = {rates['on'] / rates['off']:.2f}x")
        return {"dispatch_p50_ratio": ratio, "throughput_ratio": rates["on"] / rates["off"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000, help="dispatches per setting")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs drained per setting")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    main(args.n, args.jobs, args.rounds)

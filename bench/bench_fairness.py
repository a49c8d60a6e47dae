"""Flow control's fairness on Dramatiq (issue 27): one key floods the queue, small keys send a
few jobs each, every job under a concurrency limit per key (`bench.fair`, 2 at once per key),
run by `jobyard worker` with 2 processes x 8 threads. A small key's job must not wait behind
the big key's backlog: the small keys' p99 wait (dispatch to start) at most twice a run's time.
Jain's fairness index of throughput per key, over the time the small keys had work, should be
at least 0.95 (1.0: every key served alike; each key can run at most 2 at once, so a fair
scheduler gives every key with work the same rate).

Then priorities: a priority-100 job dispatched behind a backlog of unlimited jobs starts on the
next free slot; the wait and how many jobs started before it are printed.

    uv run python bench/bench_fairness.py                        # the issue's sizes
    uv run python bench/bench_fairness.py --flood 300 --backlog 2000   # a quick check

Dispatch of a concurrency-keyed job takes its slot in the permit store (one transaction), so
the flood's dispatch takes a while at full size; it is timed and printed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, Proc, RedisServer, fresh_database, pct, set_env, wait_for

BENCH_PATH = f"{ROOT}{os.pathsep}{ROOT / 'bench'}"


def read_runs(path: Path) -> list[tuple[str, float, float, float, str]]:
    """(key, dispatched, started, ended, label) of every run so far."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        key, at, began, ended, label = line.split()
        rows.append((key, float(at), float(began), float(ended), label))
    return rows


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1.0 when every value is equal, 1/n when one takes everything."""
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if values else 1.0


def fairness(
    flood: int, small_keys: int, per_key: int, seconds: float, out: Path, start_worker: Any
) -> None:
    """Every key's jobs are waiting before the worker starts (a live worker is pretended for
    the dispatch), so every key has a backlog when service begins: a fair scheduler then gives
    each key its limit of slots, and the same throughput, until the small keys run dry."""
    from jobyard.dispatcher import dispatch_many

    def job(key: str, i: int) -> tuple[str, dict[str, object]]:
        return ("bench.fair", {"out": str(out), "key": key, "at": 0.0, "seconds": seconds,
                               "label": str(i)})  # fmt: skip

    began = time.monotonic()
    results = dispatch_many([job("big", i) for i in range(flood)])
    took = time.monotonic() - began
    assert all(not isinstance(r, Exception) for r in results), results[:3]
    print(f"flood: {flood} jobs of key 'big' dispatched in {took:.1f} s "
          f"({took / flood * 1e3:.2f} ms each: a slot asked for at dispatch)")  # fmt: skip
    smalls = [f"small{k:02d}" for k in range(small_keys)]
    results = dispatch_many([job(key, i) for key in smalls for i in range(per_key)])
    assert all(not isinstance(r, Exception) for r in results), results[:3]
    served_from = start_worker()
    wanted = small_keys * per_key
    wait_for(
        lambda: sum(1 for r in read_runs(out) if r[0] != "big") >= wanted, timeout=600, interval=0.2
    )
    runs = read_runs(out)
    small = [r for r in runs if r[0] != "big"]
    waits = [start - served_from for _, _, start, _, _ in small]
    run_time = pct([end - start for _, _, start, end, _ in runs], 50)
    # Throughput per key while every key still had work: up to the first small key's last
    # start (after it, that key has nothing left to ask for).
    until = min(max(r[2] for r in small if r[0] == key) for key in smalls)
    span = max(1e-3, until - served_from)
    rates = {
        key: sum(1 for r in runs if r[0] == key and r[2] <= until) / span
        for key in ["big", *smalls]
    }
    index = jain(list(rates.values()))
    print(f"small keys: {len(small)} jobs, wait from the worker's start p50 "
          f"{pct(waits, 50):.3f} s, p99 {pct(waits, 99):.3f} s; a run takes {run_time:.3f} s "
          f"(p50): p99 wait = {pct(waits, 99) / run_time:.1f} x a run")  # fmt: skip
    low, high = min(rates[k] for k in smalls), max(rates[k] for k in smalls)
    print(f"starts per second per key over the {span:.2f} s every key had work: big "
          f"{rates['big']:.1f}, small ones {low:.1f}-{high:.1f}; Jain's index {index:.3f} "
          "(target >= 0.95)")  # fmt: skip
    big_done = sum(1 for r in read_runs(out) if r[0] == "big")
    print(f"(the big key had run {big_done} of its {flood} by then)")


def priority(backlog: int, seconds: float, out: Path) -> None:
    from jobyard.dispatcher import dispatch_job, dispatch_many

    payload = {"out": str(out), "key": "backlog", "at": 0.0, "seconds": seconds}
    for start in range(0, backlog, 5000):
        chunk = min(5000, backlog - start)
        results = dispatch_many([("bench.mark", payload)] * chunk)
        assert all(not isinstance(r, Exception) for r in results), results[:3]
    wait_for(lambda: len(read_runs(out)) >= 50, timeout=300, interval=0.05)
    before = len(read_runs(out))
    at = time.time()
    urgent = {"out": str(out), "key": "urgent", "at": at, "seconds": seconds, "label": "urgent"}
    dispatch_job("bench.mark", urgent, priority=100)
    wait_for(lambda: any(r[0] == "urgent" for r in read_runs(out)), timeout=300, interval=0.01)
    runs = read_runs(out)
    index = next(i for i, r in enumerate(runs) if r[0] == "urgent")
    started = runs[index][2]
    print(
        f"priority 100 behind {backlog} waiting jobs: started {started - at:.3f} s after "
        f"its dispatch, after {index - before} other start(s) ({seconds:.3f} s a run)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=10_000)
    parser.add_argument("--small-keys", type=int, default=20)
    parser.add_argument("--per-key", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.05, help="each run's time")
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="jobyard-fairness-"))
    with fresh_database() as database_url:
        for part in ("fairness", "priority"):
            redis_server = RedisServer().start()
            set_env(
                REDIS_URL=redis_server.url, DATABASE_URL=database_url, USE_DRAMATIQ="true",
                WORKER_CONCURRENCY_DEFAULT=str(args.threads), JOBYARD_JOB_MODULES="_bench_jobs",
                PYTHONPATH=BENCH_PATH, WORKER_METRICS_PORT="0", JOBYARD_SCHEDULER="false",
            )  # fmt: skip
            from jobyard.job_engine.flow import runtime

            runtime.reset()
            command = ["worker", "--queues", "default", "--processes", str(args.processes)]
            workers: list[Proc] = []

            def start_worker(command: list[str] = command, workers: list[Proc] = workers) -> float:
                from jobyard.queue import keys
                from jobyard.queue.client import get_client

                workers.append(Proc(command, dict(os.environ)))
                wait_for(_live, timeout=120)
                get_client().zrem(keys.workers("default"), PLACEHOLDER)
                return time.time()

            out = workdir / f"{part}.runs"
            try:
                if part == "fairness":
                    _pretend_a_live_worker()
                    fairness(args.flood, args.small_keys, args.per_key, args.seconds, out,
                             start_worker)  # fmt: skip
                else:
                    start_worker()
                    priority(args.backlog, args.seconds / 5, out)
            finally:
                for worker in workers:
                    worker.stop()
                redis_server.stop()


PLACEHOLDER = "bench-placeholder"


def _pretend_a_live_worker() -> None:
    """A heartbeat an hour ahead, so that dispatch queues jobs on Dramatiq before the real
    worker starts; removed once it has (`_live` waits for the real one)."""
    from jobyard.queue import keys
    from jobyard.queue.client import get_client

    client = get_client()
    seconds, _ = client.time()
    client.zadd(keys.workers("default"), {PLACEHOLDER: (seconds + 3600) * 1000})


def _live() -> bool:
    """A worker other than the placeholder beats for the queue."""
    from jobyard.queue import keys
    from jobyard.queue.client import get_client

    members = get_client().zrange(keys.workers("default"), 0, -1)
    return any(m not in (PLACEHOLDER.encode(), PLACEHOLDER) for m in members)


if __name__ == "__main__":
    main()

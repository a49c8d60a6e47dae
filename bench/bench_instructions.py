"""Instructions per no-op job of one worker process, counted by callgrind: a figure that a
busy 2-core machine does not move, where CPU seconds per job drift with the load beside them.

One `jobyard.worker.process` (8 threads, job log on) runs under `valgrind --tool=callgrind`
against a private Redis and PostgreSQL database. Once it is consuming, a warm-up of jobs runs
(imports and first calls done), the counters are zeroed (`callgrind_control -z`), `n`
system.echo jobs are dispatched, and the counters are dumped when the queue is empty. The
instructions of that window, divided by `n`, are the figure; `--top` lists the C functions
they went to (self cost), e.g. PyErr_Format for the AttributeErrors of a `__getattr__`.

To compare two commits, run it in a checkout of each (each with its own .venv); the window
also holds the worker's idle work (heartbeats, polls), a few percent at n=1,000.

    python bench/bench_instructions.py [-n 1000] [--top 20]

Needs valgrind (`apt-get install valgrind`); `perf stat -e instructions` would do where the
machine exposes hardware counters (this VM does not).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import ROOT, RedisServer, fresh_database, set_env

QUEUE_MESSAGES = "dramatiq:default.msgs"


def dispatch(n: int) -> None:
    """`n` system.echo jobs onto the private Redis, from this process."""
    from jobyard.dispatcher import dispatch_job
    from jobyard.job_engine.db.joblog import reset_writer
    from jobyard.queue.client import get_client
    from jobyard.queue.store import JobStore

    store = JobStore(get_client())
    bench_worker = f"bench:{uuid.uuid4().hex[:6]}"
    for i in range(n):
        if i % 1000 == 0:  # dispatch needs a live worker; the measured one may beat late
            store.heartbeat(bench_worker, "bench", ["default"])
        handle = dispatch_job("system.echo", {"n": i})
        assert handle.engine == "dramatiq"
    store.deregister(bench_worker, ["default"])
    reset_writer()


def drained(client, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while client.hlen(QUEUE_MESSAGES):
        if time.monotonic() > deadline:
            raise TimeoutError("the worker under callgrind did not drain its queue")
        time.sleep(0.2)


def self_costs(path: Path) -> tuple[int, collections.Counter[str]]:
    """The dump's total instructions (its summary line) and each function's self cost."""
    names: dict[str, str] = {}
    costs: collections.Counter[str] = collections.Counter()
    total, function, inclusive_next = 0, "?", False

    def name(text: str) -> str:
        match = re.match(r"\((\d+)\)(?: (.*))?", text)
        if not match:
            return text
        if match.group(2):
            names[match.group(1)] = match.group(2)
        return names.get(match.group(1), text)

    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            total = int(line.split()[1])
        elif line.startswith("fn="):
            function = name(line[3:])
        elif line.startswith("cfn="):
            name(line[4:])
        elif line.startswith("calls="):
            inclusive_next = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2:
                if inclusive_next:
                    inclusive_next = False
                else:
                    costs[function] += int(parts[1])
    return total, costs


def main(n: int = 1000, warm_up: int = 200, top: int = 0) -> float:
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    out = Path(tempfile.mkdtemp(prefix="jobyard-callgrind-"))
    redis_server = RedisServer().start()
    worker = None
    try:
        with fresh_database() as database_url:
            set_env(
                REDIS_URL=redis_server.url, USE_DRAMATIQ="true", DATABASE_URL=database_url,
                JOBYARD_JOB_LOG="true", WORKER_CONCURRENCY_DEFAULT="8",
            )  # fmt: skip
            client = redis_server.client()
            worker = subprocess.Popen(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.out",
                 sys.executable, "-m", "jobyard.worker.process", "--queues", "default"],
                env=dict(os.environ), cwd=ROOT, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + 300
            while not client.keys("jobyard:workers*"):  # its queue heartbeat: it consumes
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise TimeoutError("the worker under callgrind did not start")
                time.sleep(0.5)
            dispatch(warm_up)
            drained(client)
            time.sleep(2)
            subprocess.run(["callgrind_control", "-z", str(worker.pid)], check=True,
                           capture_output=True)  # fmt: skip
            began = time.monotonic()
            dispatch(n)
            drained(client)
            window = time.monotonic() - began
            subprocess.run(["callgrind_control", "-d", str(worker.pid)], check=True,
                           capture_output=True)  # fmt: skip
            time.sleep(1)
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        redis_server.stop()
    dumps = sorted(out.glob("callgrind.out.*"))  # the dump of the window ends in .1
    total, costs = self_costs(dumps[-1])
    per_job = total / n
    print(f"worker process, {n} no-op jobs in {window:.1f}s under callgrind: "
          f"{per_job:,.0f} instructions per job")  # fmt: skip
    for function, cost in costs.most_common(top):
        print(f"  {cost / n:10,.0f}  {function[:100]}")
    shutil.rmtree(out, ignore_errors=True)
    return per_job


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=1000, help="jobs in the measured window")
    parser.add_argument("--warm-up", type=int, default=200)
    parser.add_argument("--top", type=int, default=0, help="list the N dearest C functions")
    args = parser.parse_args()
    main(args.n, args.warm_up, args.top)

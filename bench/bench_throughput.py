"""End-to-end throughput of `system.echo` through `jobyard worker` against a bare Dramatiq
actor with the same processes and threads, each on its own fresh Redis.

Targets (issue 16), job log on: at least 1.2x bare Dramatiq at 2 x 8, at least 1.0x at 4 x 8
(where both saturate the machine), and CPU per job (worker + Redis + PostgreSQL) at most bare's.

This machine's speed drifts by up to 2x over tens of seconds (shared cores), so back-to-back
runs compare different machines. Instead every contender is started with a full queue and
paused (SIGSTOP on its process group), then they take turns: each in turn is resumed alone,
given a moment to settle, measured for a slice, and paused again. Drift then hits every
contender alike, and each still has the whole machine while it is measured.

Bare Dramatiq's consumer fetches one message per free slot and backs off while its window is
full, so at 2 x 8 it leaves part of the machine idle waiting on round trips; jobyard's consumer
refills in batches. The report therefore also gives CPU per job (worker processes, Redis,
PostgreSQL) and the ratio the two would reach if both were CPU-bound. Try `--processes 4`
to see both saturate the machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import ROOT, Proc, RedisServer, fresh_database, set_env

QUEUE_MESSAGES = "dramatiq:default.msgs"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(session_id: int) -> tuple[float, float]:
    """User + system CPU of every live process in a session (a worker and its children), and
    of every PostgreSQL process (where the job log is written)."""
    session = postgres = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()  # counted from field 3 of stat (state)
        if int(fields[3]) == session_id:
            session += int(fields[11]) + int(fields[12])
        elif comm.endswith("(postgres"):
            postgres += int(fields[11]) + int(fields[12])
    return session / CLOCK_TICKS, postgres / CLOCK_TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


@dataclass
class Contender:
    label: str
    redis_server: RedisServer
    session: int  # process group of the worker and its children
    stop_worker: Callable[[], object]
    total: int
    jobs: list[int] = field(default_factory=list)  # per slice
    seconds: list[float] = field(default_factory=list)
    worker_cpu: float = 0.0
    redis_cpu: float = 0.0
    postgres_cpu: float = 0.0
    busy: float = 0.0
    machine: float = 0.0

    #: Jobs not yet done, read from the contender's Redis (Dramatiq's messages by default).
    left_in: Callable[[Any], int] = lambda client: int(client.hlen(QUEUE_MESSAGES))

    def __post_init__(self) -> None:
        self.client = self.redis_server.client()

    def left(self) -> int:
        return self.left_in(self.client)

    def signal(self, sig: int) -> None:
        os.killpg(self.session, sig)

    def sample(self) -> tuple[int, float, tuple[float, float], float, tuple[float, float]]:
        info = self.client.info("cpu")
        return (
            self.left(),
            time.perf_counter(),
            cpu_seconds(self.session),
            float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            machine_busy(),
        )

    def measure(self, settle: float, seconds: float) -> None:
        self.signal(signal.SIGCONT)
        time.sleep(settle)
        before = self.sample()
        time.sleep(seconds)
        after = self.sample()
        self.signal(signal.SIGSTOP)
        self.jobs.append(before[0] - after[0])
        self.seconds.append(after[1] - before[1])
        self.worker_cpu += after[2][0] - before[2][0]
        self.postgres_cpu += after[2][1] - before[2][1]
        self.redis_cpu += after[3] - before[3]
        self.busy += after[4][0] - before[4][0]
        self.machine += after[4][1] - before[4][1]

    @property
    def rate(self) -> float:
        return sum(self.jobs) / sum(self.seconds)

    def per_job_us(self, cpu: float) -> float:
        return cpu / max(sum(self.jobs), 1) * 1e6

    @property
    def cpu_per_job_us(self) -> float:
        return self.per_job_us(self.worker_cpu + self.redis_cpu + self.postgres_cpu)

    def close(self) -> None:
        self.signal(signal.SIGCONT)
        self.stop_worker()
        self.redis_server.stop()


def warm_up(contender: Contender, seconds: float = 1.5, timeout: float = 60) -> None:
    """Until the worker has taken its first job and then run `seconds` more (every process
    started, connections open), then pause it."""
    deadline = time.monotonic() + timeout
    while contender.left() >= contender.total and time.monotonic() < deadline:
        time.sleep(0.01)
    if contender.left() >= contender.total:
        raise TimeoutError(f"{contender.label}: the worker took no job in {timeout}s")
    time.sleep(seconds)
    contender.signal(signal.SIGSTOP)


def start_bare(n: int, processes: int, threads: int) -> Contender:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    redis_server = RedisServer().start()
    env = {**os.environ, "REDIS_URL": redis_server.url, "PYTHONPATH": str(ROOT / "bench")}
    broker = RedisBroker(url=redis_server.url, namespace="dramatiq")
    noop = dramatiq.Actor(
        lambda job_id, payload: None, broker=broker, actor_name="noop",
        queue_name="default", priority=0, options={"max_retries": 0},
    )  # fmt: skip
    for i in range(n):  # sending is cheap: queue more than the others, so bare never runs dry
        noop.send(str(i), {"n": i})
    broker.close()
    worker = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "_bare_worker", "--processes", str(processes),
         "--threads", str(threads)],
        env=env, cwd=ROOT / "bench", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip

    def stop() -> None:
        worker.terminate()
        worker.wait(30)

    contender = Contender("bare dramatiq", redis_server, worker.pid, stop, n)
    warm_up(contender)
    return contender


def _start_session(label: str, redis_server: RedisServer, commands: list[str], n: int,
                   left: Callable[[Any], int]) -> Contender:  # fmt: skip
    """Worker processes run by one shell in their own session (paused and measured as one)."""
    env = {**os.environ, "REDIS_URL": redis_server.url, "PYTHONPATH": str(ROOT / "bench")}
    script = " & ".join(commands) + " & wait"
    worker = subprocess.Popen(
        ["sh", "-c", script], env=env, cwd=ROOT / "bench", stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def stop() -> None:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)

    contender = Contender(label, redis_server, worker.pid, stop, n, left_in=left)
    warm_up(contender)
    return contender


def start_celery(n: int, processes: int, threads: int) -> Contender:
    """Celery 5 on its Redis broker: `processes` workers of the threads pool, `threads` each."""
    from _celery_app import app, noop

    redis_server = RedisServer().start()
    app.conf.broker_url = redis_server.url
    with app.producer_or_acquire() as producer:
        for i in range(n):
            noop.apply_async((str(i), {"n": i}), producer=producer)
    celery = f"{sys.executable} -m celery -A _celery_app worker -l warning --pool threads"
    commands = [
        f"{celery} -c {threads} -n w{p}@%h --without-gossip --without-mingle --without-heartbeat"
        for p in range(processes)
    ]

    def left(client: Any) -> int:  # waiting, plus delivered and not yet acked
        return int(client.llen("celery")) + int(client.hlen("unacked"))

    return _start_session("celery (threads)", redis_server, commands, n, left)


def start_rq(n: int, processes: int, threads: int) -> Contender:
    """RQ runs one job at a time per worker: processes x threads SimpleWorkers (no fork per
    job, RQ's fastest mode), for the same concurrency."""
    import redis
    from _rq_jobs import noop
    from rq import Queue

    redis_server = RedisServer().start()
    connection = redis.Redis.from_url(redis_server.url)
    queue = Queue("default", connection=connection)
    for at in range(0, n, 1000):
        queue.enqueue_many(
            [Queue.prepare_data(noop, (str(i), {"n": i})) for i in range(at, min(n, at + 1000))]
        )
    connection.close()
    rq = f"{sys.executable} -m rq.cli worker -q --worker-class rq.worker.SimpleWorker"
    commands = [f"{rq} --url {redis_server.url} default" for _ in range(processes * threads)]

    def left(client: Any) -> int:
        return int(client.llen("rq:queue:default"))

    return _start_session(f"rq ({processes * threads} workers)", redis_server, commands, n, left)


#: Issue 16's target for jobyard / bare Dramatiq (job log on), by worker processes (x 8 threads).
THROUGHPUT_TARGETS = {2: 1.2, 4: 1.0}

#: The job jobyard's contenders run (--job): system.echo, or bench.step (one recorded step).
JOB = "system.echo"


def start_jobyard(
    label: str, n: int, processes: int, threads: int, extra_env: dict[str, str]
) -> Contender:
    redis_server = RedisServer().start()
    set_env(
        REDIS_URL=redis_server.url,
        USE_DRAMATIQ="true",
        WORKER_CONCURRENCY_DEFAULT=str(threads),
        **extra_env,
    )
    from jobyard.dispatcher import dispatch_job
    from jobyard.job_engine.db.joblog import reset_writer
    from jobyard.queue.client import get_client
    from jobyard.queue.store import JobStore

    store = JobStore(get_client())
    bench_worker = f"bench:{uuid.uuid4().hex[:6]}"
    for i in range(n):
        if i % 1000 == 0:  # dispatch needs a live worker; the real one starts after
            store.heartbeat(bench_worker, "bench", ["default"])
        handle = dispatch_job(JOB, {"n": i})
        assert handle.engine == "dramatiq"
    store.deregister(bench_worker, ["default"])
    reset_writer()  # this process's job log rows are written before anyone is measured
    command = ["worker", "--queues", "default", "--processes", str(processes)]
    worker = Proc(command, dict(os.environ))
    contender = Contender(label, redis_server, worker.pid, worker.stop, n)
    warm_up(contender)
    return contender


def main(
    n: int = 60000,
    processes: int = 2,
    threads: int = 8,
    rounds: int = 10,
    slice_seconds: float = 0.8,
    settle: float = 0.15,
    peers: bool = True,
) -> dict[str, float]:
    """`peers`: Celery and RQ too, when installed (`uv sync --group bench`; make bench does)."""
    contenders: list[Contender] = []
    with fresh_database() as database_url:
        os.environ["DATABASE_URL"] = database_url
        try:
            contenders.append(start_bare(2 * n, processes, threads))
            for label, log in ((f"jobyard {JOB}", "true"), ("jobyard, job log off", "false")):
                contenders.append(
                    start_jobyard(label, n, processes, threads, {"JOBYARD_JOB_LOG": log})
                )
            if peers and _peers_installed():
                contenders.append(start_celery(n, processes, threads))
                contenders.append(start_rq(n, processes, threads))
            for turn in range(rounds):
                if min(c.left() for c in contenders) < n // 8:
                    break  # a queue is nearly empty: its worker would idle in the slice
                first = turn % len(contenders)
                order = contenders[first:] + contenders[:first]
                for contender in order:
                    contender.measure(settle, slice_seconds)
        finally:
            for contender in contenders:
                contender.close()
    return report(contenders, processes, threads)


def report(contenders: list[Contender], processes: int, threads: int) -> dict[str, float]:
    bare, logged, unlogged, *others = contenders
    slices = len(bare.jobs)
    print(
        f"{processes} processes x {threads} threads, no-op jobs, {slices} interleaved slices of "
        f"{statistics.fmean(bare.seconds):.2f}s each"
    )
    print("CPU per job:              jobs/s      worker       Redis  PostgreSQL  machine busy")
    for c in contenders:
        print(
            f"{c.label:<24} {c.rate:8.0f}  {c.per_job_us(c.worker_cpu):7.0f} us "
            f"{c.per_job_us(c.redis_cpu):7.0f} us  {c.per_job_us(c.postgres_cpu):7.0f} us"
            f"  {c.busy / c.machine:8.0%}"
        )
    per_slice = [
        (j / s) / (bj / bs)
        for j, s, bj, bs in zip(logged.jobs, logged.seconds, bare.jobs, bare.seconds, strict=True)
    ]
    ratio = logged.rate / bare.rate
    log_ratio = logged.rate / unlogged.rate
    print(
        f"jobyard / bare = {ratio:.2f}x   (target >= {THROUGHPUT_TARGETS.get(processes, 1.0)}x; "
        f"slice by slice "
        f"{min(per_slice):.2f}-{max(per_slice):.2f}, median {statistics.median(per_slice):.2f})"
    )
    print(f"jobyard without job log / bare = {unlogged.rate / bare.rate:.2f}x")
    # Bare Dramatiq can idle on round trips while jobyard is busy; what each job costs in CPU
    # (worker, Redis, PostgreSQL) gives the ratio the two would reach if both were CPU-bound.
    cpu_ratio = bare.cpu_per_job_us / logged.cpu_per_job_us
    print(f"CPU per job, bare / jobyard = {cpu_ratio:.2f}x   (target >= 1.0x)")
    print(f"job log on / off = {log_ratio:.2f}x")
    results = {"throughput_ratio": ratio, "job_log_ratio": log_ratio, "cpu_ratio": cpu_ratio}
    for peer in others:
        name = peer.label.split(" ")[0]
        results[f"vs_{name}"] = logged.rate / peer.rate
        print(
            f"jobyard / {peer.label} = {logged.rate / peer.rate:.2f}x throughput, "
            f"{peer.cpu_per_job_us / logged.cpu_per_job_us:.2f}x CPU per job ({name} / jobyard)"
        )
    return results


def _peers_installed() -> bool:
    try:
        import celery  # noqa: F401
        import rq  # noqa: F401
    except ImportError:
        print("(Celery and RQ not installed: `uv sync --group bench` adds them)")
        return False
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=60000, help="jobs queued per contender")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--slice", type=float, default=0.8, help="seconds measured per turn")
    parser.add_argument("--no-peers", action="store_true", help="leave out Celery and RQ")
    parser.add_argument(
        "--job", default=JOB, choices=["system.echo", "bench.step"],
        help="bench.step: system.echo's work in one recorded step (bench/_bench_jobs.py)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.job != JOB:
        JOB = args.job
        os.environ["JOBYARD_JOB_MODULES"] = "_bench_jobs"
        os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'bench'}"
    main(args.n, args.processes, args.threads, args.rounds, args.slice, peers=not args.no_peers)

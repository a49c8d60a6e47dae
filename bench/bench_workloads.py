"""The jobs users run, through jobyard and its peers, measured in the same run, interleaved.

Workloads (bench/_workload.py): a no-op job; a 1 KB JSON payload with one 5 ms step returning
~200 bytes (`step1`), the same with three steps (`step3`), and two steps around a durable 1 s
sleep (`sleep`). jobyard's jobs are README-style handlers with `ctx.run` steps
(_bench_jobs.py); the bare contenders run the same calls without memoisation (_bare_worker.py,
_celery_app.py).

Contenders, each on its own redis-server (appendonly yes, appendfsync everysec), with the same
processes x threads: bare Dramatiq at its default prefetch (2 per thread) and at jobyard's
(`bare32`), Celery with the threads pool and with prefork (acks_late=True, its default
prefetch of 4 per slot), jobyard (job log on, in a fresh PostgreSQL database).

Modes:
- drain: every contender starts with a backlog and is paused (SIGSTOP on its session); then
  they take turns, each resumed alone for a slice, so a shared machine's drift hits all alike.
  A contender's backlog is topped up between its slices (its dispatching is measured apart).
- open loop at 50% and 80% of bare Dramatiq's drain rate (at jobyard's prefetch, same run):
  producer threads in this process send at a fixed schedule for --seconds, the contender alone
  running (the others paused). Dispatch->start and dispatch->done come from the jobs' own
  marks (the time taken in the job's code, the same point for every contender); the dispatch
  call's time is the web process's `dispatch_job` (bare: `send()`, `send_task()`). It "kept
  up" if, when the producer stopped, no more jobs were in flight than arrive in a job's own
  duration plus half a second (plus the prefetch windows), and all were done 2 s later.

CPU per job for every part: the dispatching process (every thread of this process but the
main one, which only measures), the workers (every process of the contender's session), its
Redis (INFO cpu, children included), and this benchmark database's PostgreSQL backends
(pg_stat_activity's pids for it, /proc/<pid>/stat). Every segment ends by checking that every
job it sent ran (the marks) and, for jobyard, is `succeeded` in the job log; a segment that
fails the check is printed INVALID.

    uv run --group bench python bench/bench_workloads.py                    # everything
    uv run --group bench python bench/bench_workloads.py --quick            # a smoke test
    uv run --group bench python bench/bench_workloads.py --workloads step1 \\
        --contenders bare32,jobyard --modes drain,80                        # one row
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import ROOT, Proc, RedisServer, fresh_database, pct, set_env, wait_for
from _workload import MARKS_ENV, WORKLOADS, Marks, Workload, payload

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BENCH_PATH = f"{ROOT}{os.pathsep}{ROOT / 'bench'}"
CONTENDERS = ["bare16", "bare32", "celery-threads", "celery-prefork", "jobyard", "temporal"]
#: The contender every ratio is taken against: bare Dramatiq at jobyard's prefetch.
REFERENCE = "bare32"


# -- CPU ----------------------------------------------------------------------------------------


def _ticks(stat_path: str) -> tuple[int, int, int]:
    """(utime + stime, session id, 0) of one /proc stat file; (0, -1, 0) if it is gone."""
    try:
        with open(stat_path) as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0, -1, 0
    return int(rest[11]) + int(rest[12]), int(rest[3]), 0


def session_cpu(session: int) -> float:
    total = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            ticks, sid, _ = _ticks(f"/proc/{entry.name}/stat")
            if sid == session:
                total += ticks
    return total / CLOCK_TICKS


def dispatcher_cpu() -> float:
    """This process's CPU but its main thread's: the producer threads and what the dispatch
    code runs in the background (jobyard's job-log thread), threads that ended included."""
    process, _, _ = _ticks("/proc/self/stat")
    main, _, _ = _ticks(f"/proc/self/task/{threading.main_thread().native_id}/stat")
    return (process - main) / CLOCK_TICKS


def machine() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


class PostgresBackends:
    """CPU of the client backends connected to one database (not the whole cluster's).
    Autovacuum's workers are left out: they come and go between two samples (their CPU
    cannot be read per database from /proc), and would land in whichever slice ran."""

    def __init__(self, database_url: str) -> None:
        import psycopg

        self.database = database_url.rsplit("/", 1)[1]
        admin = os.environ.get("BENCH_POSTGRES_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
        self.connection = psycopg.connect(admin, autocommit=True)

    def cpu(self) -> dict[int, float]:
        rows = self.connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend'",
            (self.database,),
        ).fetchall()
        return {pid: _ticks(f"/proc/{pid}/stat")[0] / CLOCK_TICKS for (pid,) in rows}

    @staticmethod
    def delta(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


@dataclass
class Parts:
    """CPU seconds spent by each part, and the machine's busy / total seconds."""

    dispatch: float = 0.0
    worker: float = 0.0
    redis: float = 0.0
    postgres: float = 0.0
    busy: float = 0.0
    machine: float = 0.0

    def __iadd__(self, other: Parts) -> Parts:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


# -- contenders ---------------------------------------------------------------------------------


class BenchRedis(RedisServer):
    """A private redis-server persisting as production runs it: AOF, fsync every second."""

    def start(self) -> BenchRedis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", self.dir,
             "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = self.client()
        try:
            wait_for(lambda: _pings(client), timeout=self.start_timeout)
        finally:
            client.close()
        return self


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@dataclass
class Segment:
    """One measured stretch of one contender: a drain, or an open-loop rate."""

    name: str
    sent: int = 0
    done: int = 0
    seconds: float = 0.0
    parts: Parts = field(default_factory=Parts)
    dispatched_for_cpu: int = 0  # jobs whose dispatch the `dispatch` CPU paid for
    calls: list[float] = field(default_factory=list)  # dispatch call seconds
    job_ids: list[str] = field(default_factory=list)
    rate: float = 0.0  # open loop: the target rate
    kept_up: bool | None = None
    left_at_end: int = 0
    lag: float = 0.0  # open loop: the producer's largest delay behind its schedule
    invalid: str | None = None
    latencies: dict[int, list[float]] = field(default_factory=dict)
    #: the jobs sent, when not 0..sent-1 (an open loop stopped early: its threads stop apart)
    indices: list[int] | None = None
    ran_dry: int = 0  # drain slices that ended with (almost) nothing left: the rate understated

    @property
    def throughput(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def per_job_us(self) -> dict[str, float]:
        jobs = max(self.done, 1)
        dispatched = max(self.dispatched_for_cpu, 1)
        p = self.parts
        return {
            "dispatch": p.dispatch / dispatched * 1e6,
            "worker": p.worker / jobs * 1e6,
            "redis": p.redis / jobs * 1e6,
            "postgres": p.postgres / jobs * 1e6,
        }


class Contender:
    def __init__(self, label: str, workload: Workload, processes: int, threads: int) -> None:
        self.label = label
        self.workload = workload
        self.processes, self.threads = processes, threads
        self.redis = BenchRedis().start()
        self.client = self.redis.client()
        self.marks_dir = tempfile.mkdtemp(prefix=f"bench-marks-{label}-")
        self.marks = Marks(self.marks_dir)
        self.session = 0
        self.segments: dict[str, Segment] = {}
        self.env = {
            **os.environ, "REDIS_URL": self.redis.url, MARKS_ENV: self.marks_dir,
            "PYTHONPATH": BENCH_PATH,
        }  # fmt: skip

    # what the web process calls, once per job; returns the job id when there is one
    def send(self, body: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def before_send(self) -> None:
        """Called before a batch of sends (jobyard: a heartbeat, its worker may be paused)."""

    def flush(self) -> None:
        """Anything the dispatch side still has to write for the jobs sent (jobyard's job log)."""

    def check(self, segment: Segment, timeout: float) -> str | None:
        """Why the segment is invalid, or None: every job sent ran to its end."""
        seen = self.marks.segment(segment.name)
        sent = segment.indices if segment.indices is not None else range(segment.sent)
        missing = [i for i in sent if seen.get(i, [0, 0, float("inf")])[2] == float("inf")]
        if missing:
            return f"{len(missing)} of {segment.sent} jobs never ended"
        return None

    def stop_worker(self) -> None:
        raise NotImplementedError

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.session, sig)

    def redis_cpu(self) -> float:
        info = self.client.info("cpu")
        keys = ("used_cpu_user", "used_cpu_sys", "used_cpu_user_children", "used_cpu_sys_children")
        return sum(float(info[k]) for k in keys)

    def close(self) -> None:
        self.signal(signal.SIGCONT)
        try:
            self.stop_worker()
        finally:
            self.client.close()
            self.redis.stop()
            shutil.rmtree(self.marks_dir, ignore_errors=True)


def _session(command: list[str] | str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    args = ["sh", "-c", command] if isinstance(command, str) else command
    return subprocess.Popen(
        args, env=env, cwd=ROOT / "bench", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


class BareDramatiq(Contender):
    def __init__(self, label: str, workload: Workload, processes: int, threads: int,
                 prefetch: int | None) -> None:  # fmt: skip
        super().__init__(label, workload, processes, threads)
        import dramatiq
        from dramatiq.brokers.redis import RedisBroker

        self.broker = RedisBroker(url=self.redis.url, namespace="dramatiq")
        self.actor = dramatiq.Actor(
            lambda body: None, broker=self.broker, actor_name=f"w_{workload.name}",
            queue_name="default", priority=0, options={},
        )  # fmt: skip
        env = dict(self.env)
        if prefetch is not None:
            env["dramatiq_queue_prefetch"] = str(prefetch)
        self.proc = _session(
            [sys.executable, "-m", "dramatiq", "_bare_worker", "--processes", str(processes),
             "--threads", str(threads)], env,
        )  # fmt: skip
        self.session = self.proc.pid

    def send(self, body: dict[str, Any]) -> None:
        self.actor.send(body)

    def stop_worker(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.broker.close()


class CeleryContender(Contender):
    def __init__(self, label: str, workload: Workload, processes: int, threads: int,
                 pool: str) -> None:  # fmt: skip
        super().__init__(label, workload, processes, threads)
        from celery import Celery

        self.app = Celery(f"bench-{label}", broker=self.redis.url)
        self.app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)
        self.task = f"w_{workload.name}"
        celery = f"{sys.executable} -m celery -A _celery_app worker -l warning --pool {pool}"
        commands = [
            f"{celery} -c {threads} -n w{p}-{uuid.uuid4().hex[:6]}@%h --without-gossip "
            "--without-mingle --without-heartbeat"
            for p in range(processes)
        ]
        self.proc = _session(" & ".join(commands) + " & wait", self.env)
        self.session = self.proc.pid

    def send(self, body: dict[str, Any]) -> None:
        self.app.send_task(self.task, (body,))

    def stop_worker(self) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()
        self.app.close()


class Jobyard(Contender):
    def __init__(self, label: str, workload: Workload, processes: int, threads: int,
                 database_url: str) -> None:  # fmt: skip
        super().__init__(label, workload, processes, threads)
        self.database_url = database_url
        set_env(
            REDIS_URL=self.redis.url, USE_DRAMATIQ="true", DATABASE_URL=database_url,
            JOBYARD_JOB_LOG="true", JOBYARD_JOB_MODULES="_bench_jobs",
            WORKER_CONCURRENCY_DEFAULT=str(threads), WORKER_METRICS_PORT="0",
            PYTHONPATH=BENCH_PATH,
        )  # fmt: skip
        import _bench_jobs  # noqa: F401 - registers the jobs (the registry may be loaded already)

        from jobyard.dispatcher import dispatch_job
        from jobyard.queue.client import get_client
        from jobyard.queue.store import JobStore

        self.dispatch_job = dispatch_job
        self.name = f"bench.w_{workload.name}"
        self.store = JobStore(get_client())
        self.fake_worker = f"bench:{uuid.uuid4().hex[:6]}"
        self.before_send()
        env = {**os.environ, MARKS_ENV: self.marks_dir}
        self.proc = Proc(["worker", "--queues", "default", "--processes", str(processes)], env)
        self.session = self.proc.pid

    def before_send(self) -> None:
        # Dispatch sends a job to Temporal when no worker of its queue is alive; this worker
        # may be paused longer than the heartbeat timeout while the others take their turn.
        self.store.heartbeat(self.fake_worker, "bench", ["default"])

    def send(self, body: dict[str, Any]) -> str:
        handle = self.dispatch_job(self.name, body)
        if handle.engine != "dramatiq":
            raise RuntimeError(f"{self.label}: a job went to {handle.engine}, not Dramatiq")
        return handle.job_id

    def flush(self) -> None:
        flush_job_log()

    def check(self, segment: Segment, timeout: float) -> str | None:
        problem = super().check(segment, timeout)
        if problem:
            return problem
        return _joblog_problem(self.database_url, segment, timeout)

    def stop_worker(self) -> None:
        self.store.deregister(self.fake_worker, ["default"])
        self.proc.stop()
        self.flush()


def flush_job_log() -> None:
    """Write what this process's job log still holds (the queued rows of its dispatches)."""
    from jobyard.job_engine.db import joblog

    current = joblog.writer()
    if current is not None:
        current.flush()


def _joblog_problem(database_url: str, segment: Segment, timeout: float) -> str | None:
    """Why the segment's jobs are not all `succeeded` in the job log, or None."""
    import sqlalchemy as sa

    from jobyard.job_engine.db import get_engine

    engine = get_engine(database_url)
    ids = segment.job_ids
    if len(ids) != segment.sent:
        return f"{segment.sent - len(ids)} dispatches returned no job id"
    deadline = time.monotonic() + timeout
    while True:  # the worker's job-log shipper writes endings every half second
        succeeded = 0
        with engine.connect() as connection:
            for at in range(0, len(ids), 5000):
                succeeded += connection.execute(
                    sa.text("SELECT count(*) FROM job_log WHERE state = 'succeeded' "
                            "AND job_id = ANY(:ids)"), {"ids": ids[at:at + 5000]},
                ).scalar_one()  # fmt: skip
        if succeeded == len(ids):
            return None
        if time.monotonic() > deadline:
            return f"{len(ids) - succeeded} of {len(ids)} jobs not `succeeded` in the job log"
        time.sleep(0.5)


def start_contender(label: str, workload: Workload, processes: int, threads: int,
                    database_url: str) -> Contender:  # fmt: skip
    if label == "bare16":
        return BareDramatiq(label, workload, processes, threads, None)
    if label == "bare32":
        from jobyard.job_engine.queues import get_queue

        os.environ["WORKER_CONCURRENCY_DEFAULT"] = str(threads)
        return BareDramatiq(label, workload, processes, threads, get_queue("default").prefetch)
    if label == "celery-threads":
        return CeleryContender(label, workload, processes, threads, "threads")
    if label == "celery-prefork":
        return CeleryContender(label, workload, processes, threads, "prefork")
    if label == "jobyard":
        return Jobyard(label, workload, processes, threads, database_url)
    raise ValueError(f"unknown contender {label!r}; known: {', '.join(CONTENDERS)}")


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Settings:
    workloads: list[str]
    contenders: list[str]
    modes: list[str]
    processes: int = 2
    threads: int = 8
    rounds: int = 8
    slice: float = 1.0
    settle: float = 0.3
    seconds: float = 20.0
    producers: int = 4
    fill_scale: float = 1.0
    capacity: float | None = None  # jobs/s the open-loop rates are taken from, if not measured
    drain_timeout: float = 180.0
    temporal_jobs: int = 400  # per contender and workload
    temporal_rounds: int = 4


class Bench:
    def __init__(self, settings: Settings, database_url: str) -> None:
        self.s = settings
        self.database_url = database_url
        self.pool = ThreadPoolExecutor(settings.producers, thread_name_prefix="producer")
        self.postgres = PostgresBackends(database_url)

    # measuring

    def snapshot(self, c: Contender, dispatch: bool = False) -> tuple[Any, ...]:
        return (
            time.perf_counter(), dispatcher_cpu() if dispatch else 0.0, session_cpu(c.session),
            c.redis_cpu(), self.postgres.cpu(), machine(),
        )  # fmt: skip

    def parts(self, before: tuple[Any, ...], after: tuple[Any, ...]) -> Parts:
        return Parts(
            dispatch=after[1] - before[1], worker=after[2] - before[2], redis=after[3] - before[3],
            postgres=PostgresBackends.delta(before[4], after[4]),
            busy=after[5][0] - before[5][0], machine=after[5][1] - before[5][1],
        )  # fmt: skip

    # dispatching

    def fill(self, c: Contender, segment: Segment, count: int) -> None:
        """Queue `count` more jobs of the segment (its worker paused); their dispatch CPU, with
        what Redis and PostgreSQL spend taking them, goes to the segment's parts."""
        c.before_send()
        first = segment.sent
        segment.sent += count
        before = self.snapshot(c, dispatch=True)

        def send_range(start: int) -> list[str | None]:
            ids = []
            for i in range(start, first + count, self.s.producers):
                body = payload(c.workload, segment.name, i)
                body["t"] = time.time()
                ids.append(c.send(body))
            return ids

        results = list(self.pool.map(send_range, range(first, first + count)[: self.s.producers]))
        self.pool.submit(c.flush).result()
        after = self.snapshot(c, dispatch=True)
        part = self.parts(before, after)
        part.worker = part.busy = part.machine = 0.0  # the worker is paused: not its share
        segment.parts += part
        segment.dispatched_for_cpu += count
        for ids in results:
            segment.job_ids.extend(i for i in ids if i is not None)

    def wait_done(self, c: Contender, segment: Segment, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while c.marks.done(segment.name) < segment.sent:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def warm_up(self, contenders: list[Contender]) -> None:
        """Until every worker ran a first batch (its processes started, connections open);
        they start together, which saves their start-up times on a busy machine."""
        for c in contenders:
            c.segments["warm"] = Segment("warm")
            self.fill(c, c.segments["warm"], 50 * self.s.processes)
        for c in contenders:
            if not self.wait_done(c, c.segments["warm"], 120):
                raise TimeoutError(f"{c.label}: the worker ran {c.marks.done('warm')} of "
                                   f"{c.segments['warm'].sent} warm-up jobs in 120 s")  # fmt: skip
        time.sleep(0.5)
        for c in contenders:
            c.signal(signal.SIGSTOP)
            del c.segments["warm"]

    # drain

    def drain(self, contenders: list[Contender]) -> None:
        """Interleaved slices; the first round only calibrates (each contender's rate sets how
        much it is given for the next slices: enough that it never runs dry, little enough
        that what is left at the end drains in seconds, however slow the contender)."""
        workload = contenders[0].workload
        fill = max(100, int(workload.drain_fill * self.s.fill_scale))
        # a slice outlasts a durable sleep, or a slow contender ends no job in it
        slice_ = max(self.s.slice, 2 * workload.sleep)
        floor = 4 * self.s.processes * self.s.threads  # more than every prefetch window
        for c in contenders:
            c.segments["drain"] = Segment("drain")
            self.fill(c, c.segments["drain"], fill)
        rates: dict[str, float] = {}
        rounds = self.s.rounds + 1
        for turn in range(rounds):
            first = turn % len(contenders)
            for c in contenders[first:] + contenders[:first]:
                seg = c.segments["drain"]
                backlog = seg.sent - c.marks.done("drain")
                if c.label in rates:  # three slices' worth at the last slice's rate
                    need = max(floor, int(rates[c.label] * (self.s.settle + slice_) * 3))
                    if backlog < need:
                        self.fill(c, seg, 2 * need - backlog)
                        backlog = 2 * need
                c.signal(signal.SIGCONT)
                time.sleep(self.s.settle)
                start_done = c.marks.done("drain")
                before = self.snapshot(c)
                time.sleep(slice_)
                after = self.snapshot(c)
                end_done = c.marks.done("drain")
                c.signal(signal.SIGSTOP)
                rates[c.label] = (end_done - start_done) / (after[0] - before[0])
                if turn == 0 and rounds > 1:
                    continue  # calibration
                if seg.sent - end_done < floor // 4:
                    seg.ran_dry += 1
                seg.done += end_done - start_done
                seg.seconds += after[0] - before[0]
                seg.parts += self.parts(before, after)
        for c in contenders:  # every job sent must end: all resume together
            c.signal(signal.SIGCONT)
        for c in contenders:
            seg = c.segments["drain"]
            if not self.wait_done(c, seg, self.s.drain_timeout):
                seg.invalid = f"{seg.sent - c.marks.done('drain')} of {seg.sent} jobs not done"
        for c in contenders:  # checked running: jobyard's worker ships the job log's endings
            seg = c.segments["drain"]
            seg.invalid = seg.invalid or c.check(seg, 30)
        for c in contenders:
            c.signal(signal.SIGSTOP)

    # open loop

    def open_loop(self, c: Contender, name: str, rate: float) -> None:
        seg = c.segments[name] = Segment(name, rate=rate)
        workload = c.workload
        c.before_send()
        c.signal(signal.SIGCONT)
        time.sleep(1.0)  # its consumers refill, its heartbeat is fresh
        total = int(rate * self.s.seconds)
        start_at = time.perf_counter() + 0.05
        stop = threading.Event()
        lags = [0.0] * self.s.producers
        sent = [0] * self.s.producers

        indices: list[int] = []

        def produce(k: int) -> tuple[list[float], list[str | None]]:
            calls: list[float] = []
            ids: list[str | None] = []
            for i in range(k, total, self.s.producers):
                if stop.is_set():
                    break
                due = start_at + i / rate
                now = time.perf_counter()
                if due > now:
                    time.sleep(due - now)
                else:
                    lags[k] = max(lags[k], now - due)
                body = payload(workload, name, i)
                body["t"] = time.time()
                began = time.perf_counter()
                ids.append(c.send(body))
                calls.append(time.perf_counter() - began)
                indices.append(i)
                sent[k] += 1
            return calls, ids

        before = self.snapshot(c, dispatch=True)
        futures = [self.pool.submit(produce, k) for k in range(self.s.producers)]
        # Stop early when the backlog shows the contender cannot keep up (its drain would take
        # minutes): 2 s of arrivals more than are in flight when it keeps up.
        limit = rate * (2.0 + workload.sleep + workload.step_seconds) + 4 * self.s.threads
        while not all(f.done() for f in futures):
            time.sleep(0.25)
            if sum(sent) - c.marks.done(name) > limit:
                stop.set()
        for f in futures:
            calls, ids = f.result()
            seg.calls.extend(calls)
            seg.job_ids.extend(i for i in ids if i is not None)
        produced_at = time.perf_counter()
        seg.sent = sum(sent)
        seg.indices = indices
        seg.lag = max(lags)
        seg.left_at_end = seg.sent - c.marks.done(name)
        # Kept up: when the producer stopped, no more in flight than half a second of arrivals
        # beyond a job's own duration (and the prefetch windows), and all done soon after.
        in_flight = rate * (workload.sleep + workload.step_seconds + 0.5) + 4 * self.s.threads
        seg.kept_up = (
            not stop.is_set()
            and seg.left_at_end <= in_flight
            and self.wait_done(c, seg, workload.sleep + 2.0)
        )
        if not seg.kept_up and not self.wait_done(c, seg, self.s.drain_timeout):
            seg.invalid = f"{seg.sent - c.marks.done(name)} of {seg.sent} jobs not done"
        self.pool.submit(c.flush).result()
        after = self.snapshot(c, dispatch=True)
        seg.seconds = produced_at - start_at
        seg.done = c.marks.done(name)
        seg.dispatched_for_cpu = seg.sent
        seg.parts = self.parts(before, after)
        seg.latencies = c.marks.segment(name)
        seg.invalid = seg.invalid or c.check(seg, 30)
        c.signal(signal.SIGSTOP)

    # a workload

    def run_workload(self, workload: Workload, labels: list[str]) -> list[Contender]:
        contenders: list[Contender] = []
        print(f"\n== {workload.name}: starting {', '.join(labels)} ==", flush=True)
        try:
            for label in labels:
                c = start_contender(label, workload, self.s.processes, self.s.threads,
                                    self.database_url)  # fmt: skip
                contenders.append(c)
            self.warm_up(contenders)
            if "drain" in self.s.modes:
                self.drain(contenders)
                report_drain(workload, contenders)
            loads = [m for m in self.s.modes if m != "drain"]
            if loads:
                capacity = self.s.capacity
                ref = next((c for c in contenders if c.label == REFERENCE), None)
                if capacity is None and ref is not None and "drain" in ref.segments:
                    capacity = ref.segments["drain"].throughput
                if capacity is None:
                    raise SystemExit(f"open-loop modes need {REFERENCE}'s drain or --capacity")
                for n, load in enumerate(loads):
                    rate = capacity * int(load) / 100
                    order = contenders[n % len(contenders) :] + contenders[: n % len(contenders)]
                    for c in order:
                        behind = [m for m, g in c.segments.items() if g.kept_up is False]
                        if behind:  # it would only fall behind further, for minutes
                            c.segments[f"load{load}"] = Segment(
                                f"load{load}",
                                rate=rate,
                                invalid=f"skipped: fell behind at {behind[0][4:]}%",
                            )
                            continue
                        self.open_loop(c, f"load{load}", rate)
                    report_open_loop(workload, contenders, f"load{load}", int(load))
        finally:
            for c in contenders:
                try:
                    c.close()
                except Exception as exc:
                    print(f"({c.label}: close failed: {exc!r})")
        return contenders


# -- Temporal -----------------------------------------------------------------------------------


def _temporal_server_pid(port: int) -> int:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"start-dev" in cmdline and str(port).encode() in cmdline:
                return int(entry.name)
    raise RuntimeError(f"no Temporal dev server on port {port}")


@dataclass
class TemporalRow:
    workload: str
    label: str
    jobs: int = 0
    seconds: float = 0.0
    parts: Parts = field(default_factory=Parts)
    server: float = 0.0  # the Temporal dev server's CPU seconds
    invalid: str | None = None
    job_ids: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # dispatches that raised
    retries: int = 0  # dispatches given again, as the error says, with the same job id

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0

    def per_job_us(self) -> dict[str, float]:
        jobs = max(self.jobs, 1)
        p = self.parts
        return {
            "dispatch": p.dispatch / jobs * 1e6,
            "worker": p.worker / jobs * 1e6,
            "temporal": self.server / jobs * 1e6,
            "postgres": p.postgres / jobs * 1e6,
        }


CONCURRENT_STARTS = 8  # as many starts in flight as 8 web threads dispatching


def temporal_rows(settings: Settings, database_url: str, postgres: PostgresBackends,
                  n: int, rounds: int) -> list[TemporalRow]:  # fmt: skip
    """jobyard's Temporal fallback (USE_DRAMATIQ=false) against a bare workflow with the same
    activities and local activities, `rounds` interleaved batches of n/rounds jobs each, every
    batch dispatched CONCURRENT_STARTS at a time and timed until its last workflow closed."""
    import asyncio

    from _common import TemporalDevServer
    from temporalio.client import Client

    redis_server = BenchRedis().start()
    server = TemporalDevServer().start()
    server_pid = _temporal_server_pid(server.port)
    task_queue = f"bench-{uuid.uuid4().hex[:8]}"
    bare_queue = f"bare-{uuid.uuid4().hex[:8]}"
    marks_dir = tempfile.mkdtemp(prefix="bench-marks-temporal-")
    set_env(
        REDIS_URL=redis_server.url, USE_DRAMATIQ="false", DATABASE_URL=database_url,
        JOBYARD_JOB_LOG="true", JOBYARD_JOB_MODULES="_bench_jobs", TEMPORAL_ADDRESS=server.address,
        TEMPORAL_TASK_QUEUE=task_queue, PYTHONPATH=BENCH_PATH, WORKER_METRICS_PORT="0",
    )  # fmt: skip
    import _bench_jobs  # noqa: F401

    from jobyard.dispatcher import dispatch_job, warm_up

    worker = Proc(["temporal-worker"], {**os.environ, MARKS_ENV: marks_dir})
    bare = _session([sys.executable, str(ROOT / "bench" / "_bare_temporal_worker.py"),
                     server.address, bare_queue], dict(os.environ))  # fmt: skip
    rows: list[TemporalRow] = []
    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(Client.connect(server.address))
    pool = ThreadPoolExecutor(CONCURRENT_STARTS)

    def running(queue: str) -> int:
        query = f"TaskQueue = '{queue}' AND ExecutionStatus = 'Running'"
        return loop.run_until_complete(client.count_workflows(query)).count

    def completed_of(ids: list[str]) -> int:
        from temporalio.client import WorkflowExecutionStatus

        async def count() -> int:
            gate = asyncio.Semaphore(16)

            async def status(workflow_id: str) -> bool:
                async with gate:
                    described = await client.get_workflow_handle(workflow_id).describe()
                    return described.status == WorkflowExecutionStatus.COMPLETED

            return sum(await asyncio.gather(*(status(i) for i in ids)))

        return loop.run_until_complete(count())

    def sample(session: int) -> tuple[Any, ...]:
        return (
            time.perf_counter(),
            dispatcher_cpu(),
            session_cpu(session),
            _ticks(f"/proc/{server_pid}/stat")[0] / CLOCK_TICKS,
            postgres.cpu(),
            machine(),
        )

    def run_jobyard(workload: Workload, row: TemporalRow, start: int, count: int) -> None:
        name = f"bench.w_{workload.name}"

        def one(i: int) -> str | None:
            body = payload(workload, "temporal", i)
            body["t"] = time.time()
            from jobyard.dispatcher.errors import DispatchOutcomeUnknownError

            job_id = None
            for _ in range(4):  # a start past TEMPORAL_START_TIMEOUT on a busy machine
                try:
                    handle = dispatch_job(name, body, job_id=job_id)
                    break
                except DispatchOutcomeUnknownError as exc:  # safe again with the same id
                    job_id = exc.job_id
                    row.retries += 1
                except Exception as exc:
                    row.failures.append(f"{type(exc).__name__}: {exc}"[:120])
                    return None
            else:
                row.failures.append(f"no answer in 4 tries for {job_id}")
                return None
            if handle.engine != "temporal":
                raise RuntimeError(f"a job went to {handle.engine}")
            return handle.job_id

        before = sample(worker.pid)
        ids = [i for i in pool.map(one, range(start, start + count)) if i is not None]
        wait_for(lambda: running(task_queue) == 0, timeout=600, interval=0.1)
        flush_job_log()  # the dispatch side's queued rows, within the measured time
        after = sample(worker.pid)
        _add(row, before, after, count)
        row.job_ids.extend(ids)

    def run_bare(workload: Workload, row: TemporalRow, start: int, count: int) -> None:
        async def start_all() -> None:
            gate = asyncio.Semaphore(CONCURRENT_STARTS)

            async def one(i: int) -> None:
                body = payload(workload, "temporal", i)
                async with gate:
                    await client.start_workflow(
                        "bare.workload", [body, workload.steps, workload.sleep],
                        id=f"{bare_queue}-{workload.name}-{i}", task_queue=bare_queue,
                    )  # fmt: skip

            await asyncio.gather(*(one(i) for i in range(start, start + count)))

        before = sample(bare.pid)
        loop.run_until_complete(start_all())
        wait_for(lambda: running(bare_queue) == 0, timeout=600, interval=0.1)
        after = sample(bare.pid)
        _add(row, before, after, count)

    def _add(row: TemporalRow, before: tuple[Any, ...], after: tuple[Any, ...], count: int) -> None:
        row.jobs += count
        row.seconds += after[0] - before[0]
        row.parts += Parts(
            dispatch=after[1] - before[1], worker=after[2] - before[2],
            postgres=PostgresBackends.delta(before[4], after[4]),
            busy=after[5][0] - before[5][0], machine=after[5][1] - before[5][1],
        )  # fmt: skip
        row.server += after[3] - before[3]

    try:
        wait_for(lambda: "Temporal worker polling" in worker.output(), timeout=120)
        warm_up()
        for workload_name in settings.workloads:
            workload = WORKLOADS[workload_name]
            bare_row = TemporalRow(workload.name, "bare Temporal")
            row = TemporalRow(workload.name, "jobyard fallback")
            per_round = max(1, n // rounds)
            run_bare(workload, TemporalRow("", ""), 0, 4)  # warm: workers started, caches filled
            run_jobyard(workload, TemporalRow("", ""), 0, 4)
            measured: list[int] = []
            for r in range(rounds):
                start = 100 + r * per_round
                measured += range(start, start + per_round)
                if r % 2 == 0:
                    run_bare(workload, bare_row, start, per_round)
                    run_jobyard(workload, row, start, per_round)
                else:
                    run_jobyard(workload, row, start, per_round)
                    run_bare(workload, bare_row, start, per_round)
            done = completed_of([f"{bare_queue}-{workload.name}-{i}" for i in measured])
            if done != len(measured):
                bare_row.invalid = f"{done} of {len(measured)} bare workflows completed"
            check = Segment("temporal", sent=len(row.job_ids), job_ids=row.job_ids)
            row.invalid = _joblog_problem(database_url, check, 60)
            if row.failures:
                row.invalid = f"{len(row.failures)} dispatches raised, e.g. {row.failures[0]}"
            if row.retries:
                print(f"({row.retries} jobyard dispatches gave DispatchOutcomeUnknownError and "
                      "were given again with the same job id)")  # fmt: skip
            rows += [bare_row, row]
            report_temporal(workload, bare_row, row)
    finally:
        pool.shutdown()
        loop.close()
        worker.stop()
        bare.terminate()
        bare.wait(30)
        server.stop()
        redis_server.stop()
        shutil.rmtree(marks_dir, ignore_errors=True)
    return rows


# -- reporting ----------------------------------------------------------------------------------


def _us(parts: dict[str, float]) -> str:
    total = sum(parts.values())
    return (f"{parts['dispatch']:6.0f} {parts['worker']:7.0f} {parts['redis']:6.0f} "
            f"{parts['postgres']:6.0f} {total:7.0f}")  # fmt: skip


def _ref(contenders: list[Contender], mode: str) -> Segment | None:
    for c in contenders:
        if c.label == REFERENCE and mode in c.segments and not c.segments[mode].invalid:
            return c.segments[mode]
    return None


def report_drain(workload: Workload, contenders: list[Contender]) -> None:
    ref = _ref(contenders, "drain")
    slices = contenders[0].segments["drain"].seconds
    print(f"-- {workload.name}, drain: {len(contenders)} contenders x {slices:.1f} s measured, "
          "interleaved slices")  # fmt: skip
    print(f"{'contender':<15} {'jobs/s':>8} {'x ' + REFERENCE:>9}   CPU us/job: dispatch  worker "
          " Redis     PG   total  x ref  machine busy")  # fmt: skip
    for c in contenders:
        seg = c.segments["drain"]
        if seg.invalid:
            print(f"{c.label:<15} INVALID: {seg.invalid}")
            continue
        parts = seg.per_job_us()
        ratio = f"{seg.throughput / ref.throughput:8.2f}x" if ref else "        -"
        cpu_ratio = (f"{sum(parts.values()) / sum(ref.per_job_us().values()):5.2f}x"
                     if ref else "     -")  # fmt: skip
        busy = seg.parts.busy / seg.parts.machine if seg.parts.machine else 0.0
        print(f"{c.label:<15} {seg.throughput:8.0f} {ratio}              {_us(parts)}  "
              f"{cpu_ratio}  {busy:6.0%}")  # fmt: skip
        if seg.ran_dry:
            print(f"{'':<15} ({seg.ran_dry} slices ran dry: its rate is understated)")
    sys.stdout.flush()


def _lat(values: list[float]) -> str:
    if not values:
        return "        -"
    ms = [v * 1000 for v in values]
    return f"{pct(ms, 50):6.1f} {pct(ms, 95):6.1f} {pct(ms, 99):7.1f} {max(ms):7.1f}"


def latencies(seg: Segment) -> tuple[list[float], list[float]]:
    starts = [v[1] - v[0] for v in seg.latencies.values() if v[1] != float("inf")]
    dones = [v[2] - v[0] for v in seg.latencies.values() if v[2] != float("inf")]
    return starts, dones


def report_open_loop(workload: Workload, contenders: list[Contender], mode: str, load: int) -> None:
    rate = contenders[0].segments[mode].rate
    print(f"-- {workload.name}, open loop at {load}% of {REFERENCE}'s drain rate: {rate:.0f} jobs/s"
          f" for {contenders[0].segments[mode].seconds:.1f} s")  # fmt: skip
    print(f"{'contender':<15} {'kept up':<13} {'dispatch->start ms p50/p95/p99/max':<33} "
          f"{'dispatch->done ms p50/p95/p99/max':<33} call us p50/p99  CPU us/job: dispatch "
          "worker Redis PG total  busy")  # fmt: skip
    for c in contenders:
        seg = c.segments[mode]
        if seg.invalid:
            tag = "" if seg.invalid.startswith("skipped") else "INVALID: "
            print(f"{c.label:<15} {tag}{seg.invalid}")
            continue
        starts, dones = latencies(seg)
        kept = "yes" if seg.kept_up else f"no ({seg.left_at_end} left)"
        calls = [v * 1e6 for v in seg.calls]
        busy = seg.parts.busy / seg.parts.machine if seg.parts.machine else 0.0
        print(
            f"{c.label:<15} {kept:<13} {_lat(starts):<33} {_lat(dones):<33} "
            f"{pct(calls, 50):6.0f} {pct(calls, 99):6.0f}  {_us(seg.per_job_us())}  {busy:4.0%}"
        )
        if seg.lag > 0.1:
            print(f"{'':<15} (the producer ran up to {seg.lag * 1000:.0f} ms behind its schedule)")
    sys.stdout.flush()


def report_temporal(workload: Workload, bare: TemporalRow, row: TemporalRow) -> None:
    locals_ = 2 + (1 if workload.sleep else 0)
    print(f"-- {workload.name}, Temporal: {workload.steps} activities + {locals_} local activities"
          f"{' + a timer' if workload.sleep else ''} per workflow, {bare.jobs} jobs each, "
          f"{CONCURRENT_STARTS} starts in flight")  # fmt: skip
    print(f"{'contender':<17} {'jobs/s':>7} {'x bare':>7}   CPU us/job: dispatch  worker "
          "Temporal     PG   total  busy")  # fmt: skip
    for r in (bare, row):
        if r.invalid:
            print(f"{r.label:<17} INVALID: {r.invalid}")
            continue
        ratio = f"{r.rate / bare.rate:6.2f}x" if not bare.invalid else "      -"
        u = r.per_job_us()
        busy = r.parts.busy / r.parts.machine if r.parts.machine else 0.0
        print(f"{r.label:<17} {r.rate:7.1f} {ratio}               {u['dispatch']:6.0f} "
              f"{u['worker']:7.0f} {u['temporal']:8.0f} {u['postgres']:6.0f} "
              f"{sum(u.values()):7.0f}  {busy:4.0%}")  # fmt: skip
    sys.stdout.flush()


@dataclass
class Target:
    what: str
    verdict: bool | None  # None: not measured in this run
    measured: str


def targets(results: dict[str, list[Contender]], temporal: list[TemporalRow]) -> list[Target]:
    """Issue 26 item 2, from this run's figures (jobyard against bare32)."""
    out: list[Target] = []

    def seg(workload: str, label: str, mode: str) -> Segment | None:
        for c in results.get(workload, []):
            if c.label == label and mode in c.segments and not c.segments[mode].invalid:
                return c.segments[mode]
        return None

    def skipped(workload: str, mode: str) -> tuple[bool | None, str]:
        """A load jobyard was not run at because it fell behind at a lower one fails."""
        for c in results.get(workload, []):
            if c.label == "jobyard" and mode in c.segments:
                reason = c.segments[mode].invalid or ""
                return (False if reason.startswith("skipped") else None), reason or "INVALID"
        return None, "not measured"

    def drain_ratio(workload: str, floor: float, what: str) -> None:
        j, b = seg(workload, "jobyard", "drain"), seg(workload, REFERENCE, "drain")
        if j and b:
            r = j.throughput / b.throughput
            out.append(
                Target(
                    what, r >= floor, f"{r:.2f}x ({j.throughput:.0f} / {b.throughput:.0f} jobs/s)"
                )
            )
        else:
            out.append(Target(what, None, "not measured, or INVALID"))

    drain_ratio("step1", 0.9, "step1: drain >= 0.9x bare (equal prefetch)")
    j, b = seg("step1", "jobyard", "drain"), seg("step1", REFERENCE, "drain")
    if j and b:
        r = sum(j.per_job_us().values()) / sum(b.per_job_us().values())
        out.append(Target("step1: CPU per job, all parts, <= 1.3x bare", r <= 1.3,
                          f"{r:.2f}x ({sum(j.per_job_us().values()):.0f} / "
                          f"{sum(b.per_job_us().values()):.0f} us)"))  # fmt: skip
    else:
        out.append(Target("step1: CPU per job, all parts, <= 1.3x bare", None, "not measured"))
    j, b = seg("step1", "jobyard", "load80"), seg("step1", REFERENCE, "load80")
    if j and b:
        jp, bp = pct(latencies(j)[0], 99), pct(latencies(b)[0], 99)
        ok = bool(j.kept_up) and jp <= 2 * bp
        out.append(Target("step1 at 80%: keeps up, p99 dispatch->start <= 2x bare's", ok,
                          f"kept up: {'yes' if j.kept_up else 'no'}, {jp * 1000:.1f} ms / "
                          f"{bp * 1000:.1f} ms = {jp / bp:.2f}x"))  # fmt: skip
    else:
        out.append(Target("step1 at 80%: keeps up, p99 dispatch->start <= 2x bare's",
                          *skipped("step1", "load80")))  # fmt: skip
    drain_ratio("step3", 0.7, "step3: drain >= 0.7x bare (the same calls, no memoisation)")
    drain_ratio("noop", 1.1, "noop: drain >= 1.1x bare")
    j = seg("noop", "jobyard", "load80")
    if j:
        jp = pct(latencies(j)[0], 99)
        out.append(
            Target(
                "noop at 80%: p99 dispatch->start < 20 ms",
                bool(j.kept_up) and jp < 0.020,
                f"{jp * 1000:.1f} ms, kept up: {'yes' if j.kept_up else 'no'}",
            )
        )
    else:
        out.append(Target("noop at 80%: p99 dispatch->start < 20 ms", *skipped("noop", "load80")))
    for workload in results:
        for mode in ("load50", "load80"):
            j, b = seg(workload, "jobyard", mode), seg(workload, REFERENCE, mode)
            if j and b and j.calls and b.calls:
                jp, bp = pct(j.calls, 99), pct(b.calls, 99)
                out.append(
                    Target(
                        f"web, {workload} at {mode[4:]}%: dispatch_job p99 <= 1.5x send()'s",
                        jp <= 1.5 * bp,
                        f"{jp * 1e6:.0f} / {bp * 1e6:.0f} us = {jp / bp:.2f}x"
                        + (
                            ""
                            if j.kept_up
                            else " (jobyard fell behind: its producer stopped early)"
                        ),
                    )
                )
    for bare, row in zip(temporal[::2], temporal[1::2], strict=True):
        what = f"Temporal fallback, {row.workload}: >= 1.0x bare Temporal (same activities)"
        if bare.invalid or row.invalid:
            out.append(Target(what, None, "INVALID"))
        else:
            r = row.rate / bare.rate
            out.append(
                Target(what, r >= 1.0, f"{r:.2f}x ({row.rate:.1f} / {bare.rate:.1f} jobs/s)")
            )
    return out


def print_targets(rows: list[Target]) -> None:
    print(
        "\n== issue 26 targets (jobyard against bare Dramatiq at jobyard's prefetch, this run) =="
    )
    for t in rows:
        verdict = "PASS" if t.verdict else ("FAIL" if t.verdict is False else "----")
        print(f"{verdict}  {t.what:<62} {t.measured}")
    sys.stdout.flush()


def main(settings: Settings) -> dict[str, list[Contender]]:
    results: dict[str, list[Contender]] = {}
    temporal: list[TemporalRow] = []
    queue_contenders = [c for c in settings.contenders if c != "temporal"]
    print(
        f"{settings.processes} processes x {settings.threads} threads per contender; "
        f"{os.cpu_count()} CPUs; the machine is shared: figures drift, ratios are what to read"
    )
    with fresh_database() as database_url:
        bench = Bench(settings, database_url)
        try:
            if queue_contenders:
                for name in settings.workloads:
                    results[name] = bench.run_workload(WORKLOADS[name], queue_contenders)
            if "temporal" in settings.contenders:
                print("\n== Temporal: jobyard's fallback against bare Temporal ==", flush=True)
                temporal = temporal_rows(
                    settings,
                    database_url,
                    bench.postgres,
                    settings.temporal_jobs,
                    settings.temporal_rounds,
                )
        finally:
            bench.pool.shutdown()
            bench.postgres.connection.close()
    print_targets(targets(results, temporal))
    return results


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small counts, a few seconds a row")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--modes", default="drain,50,80", help="drain and/or load percentages")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--slice", type=float, help="seconds per drain slice")
    parser.add_argument("--seconds", type=float, help="seconds per open-loop rate")
    parser.add_argument("--capacity", type=float, help=f"jobs/s for the loads, without {REFERENCE}")
    args = parser.parse_args(argv)
    settings = Settings(
        workloads=args.workloads.split(","), contenders=args.contenders.split(","),
        modes=args.modes.split(","), processes=args.processes, threads=args.threads,
        capacity=args.capacity,
    )  # fmt: skip
    if args.quick:
        settings.rounds, settings.slice, settings.seconds = 2, 0.5, 3.0
        settings.fill_scale, settings.drain_timeout = 0.1, 60.0
        settings.temporal_jobs, settings.temporal_rounds = 24, 2
    if args.rounds:
        settings.rounds = args.rounds
    if args.slice:
        settings.slice = args.slice
    if args.seconds:
        settings.seconds = args.seconds
    return settings


if __name__ == "__main__":
    main(parse())

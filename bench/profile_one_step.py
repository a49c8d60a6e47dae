"""Where a job's CPU goes, per process: py-spy on the workers and on the dispatching process,
`INFO commandstats` on Redis, and the database's own counters on PostgreSQL (transactions and
rows written per job, per table; pg_stat_statements needs shared_preload_libraries, which a
shared cluster cannot be restarted for).

One contender of bench_workloads runs one workload at a steady open-loop rate, alone, while
py-spy samples every process of it (the dispatching process too) for the whole window:

    uv pip install py-spy   # not in the lock file: `uv sync` removes it again
    uv run --group bench python bench/profile_one_step.py --contender jobyard --rate 300

Prints, per process, its CPU per job and the functions with the most samples (py-spy --gil:
the thread holding the GIL, which is where a Python process's CPU goes; C code that releases
the GIL, a socket wait or libpq's work, is not sampled), self and inclusive, and the Redis
commands and PostgreSQL writes per job.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import bench_workloads as bw
from _common import fresh_database
from _workload import WORKLOADS

PY_SPY = shutil.which("py-spy") or str(Path(os.sys.executable).parent / "py-spy")  # type: ignore[attr-defined]


def processes_of(session: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            _, sid, _ = bw._ticks(f"/proc/{entry.name}/stat")
            if sid == session:
                try:
                    comm = Path(f"/proc/{entry.name}/comm").read_text().strip()
                except OSError:
                    continue
                if comm.startswith("python") or "jobyard" in comm or "celery" in comm:
                    out.append(int(entry.name))
    return out


def record(pid: int, seconds: float, directory: str) -> tuple[subprocess.Popen[bytes], str]:
    path = os.path.join(directory, f"{pid}.txt")
    proc = subprocess.Popen(
        [PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
         "--format", "raw", "--output", path, "--nonblocking", "--gil"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, path


def summarise(path: str, top: int) -> list[str]:
    """The collapsed stacks of py-spy's raw format: 'frame;frame;... count' per line."""
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    threads: collections.Counter[str] = collections.Counter()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return ["  (no samples)"]
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        leaf = frames[-1]
        self_counts[_short(leaf)] += count
        for name in {_short(f) for f in frames[1:]}:
            inclusive[name] += count
    if not total:
        return ["  (no samples)"]
    out = [f"  {total} samples; by thread: " + ", ".join(
        f"{name} {n / total:.0%}" for name, n in threads.most_common(6))]  # fmt: skip
    out.append("  self:")
    out += [f"    {n / total:6.1%}  {name}" for name, n in self_counts.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top * 2)]
    return out


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    parts = file.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{name} ({tail})"


def commandstats(client: object) -> dict[str, tuple[int, float]]:
    info = client.info("commandstats")  # type: ignore[attr-defined]
    return {k.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for k, v in info.items()}


def table_writes(connection: object) -> dict[str, tuple[int, int, int, int]]:
    rows = connection.execute(  # type: ignore[attr-defined]
        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables"
    ).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def database_counters(connection: object) -> tuple[int, int]:
    row = connection.execute(  # type: ignore[attr-defined]
        "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    return int(row[0]), int(row[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contender", default="jobyard", choices=bw.CONTENDERS[:-1])
    parser.add_argument("--workload", default="step1", choices=list(WORKLOADS))
    parser.add_argument("--rate", type=float, default=300.0, help="jobs/s, open loop")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    import psycopg

    settings = bw.Settings(workloads=[args.workload], contenders=[args.contender], modes=[])
    settings.seconds = args.seconds
    directory = tempfile.mkdtemp(prefix="bench-profile-")
    with fresh_database() as database_url:
        bench = bw.Bench(settings, database_url)
        c = bw.start_contender(args.contender, WORKLOADS[args.workload], settings.processes,
                               settings.threads, database_url)  # fmt: skip
        database = psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True)
        try:
            bench.warm_up([c])
            c.signal(signal.SIGCONT)
            time.sleep(0.5)
            pids = processes_of(c.session)
            c.signal(signal.SIGSTOP)
            c.client.config_resetstat()
            writes_before, xacts_before = table_writes(database), database_counters(database)
            # py-spy starts as the producer does (open_loop resumes the worker and waits 1 s)
            spies = [(pid, *record(pid, args.seconds + 1.5, directory)) for pid in pids]
            spies.append((os.getpid(), *record(os.getpid(), args.seconds + 1.5, directory)))
            cpu_before = {pid: bw._ticks(f"/proc/{pid}/stat")[0] for pid, _, _ in spies}
            bench.open_loop(c, "profile", args.rate)
            cpu_after = {pid: bw._ticks(f"/proc/{pid}/stat")[0] for pid, _, _ in spies}
            for _, proc, _ in spies:
                proc.wait(60)
            seg = c.segments["profile"]
            stats = commandstats(c.client)
            writes_after, xacts_after = table_writes(database), database_counters(database)
        finally:
            database.close()
            c.close()
            bench.pool.shutdown()
            bench.postgres.connection.close()
    jobs = max(seg.done, 1)
    print(f"\n{args.contender}, {args.workload}, open loop {args.rate:.0f} jobs/s for "
          f"{seg.seconds:.1f} s: {seg.sent} sent, {seg.done} done, kept up: {seg.kept_up}, "
          f"{seg.invalid or 'valid'}")  # fmt: skip
    u = seg.per_job_us()
    print("CPU per job (us): " + ", ".join(f"{k} {v:.0f}" for k, v in u.items())
          + f", total {sum(u.values()):.0f}")  # fmt: skip
    for pid, _, path in spies:
        role = "dispatching process (this one)" if pid == os.getpid() else f"worker pid {pid}"
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:90]
        except OSError:
            cmd = ""
        used = (cpu_after[pid] - cpu_before[pid]) / bw.CLOCK_TICKS / jobs * 1e6
        print(f"\n-- py-spy, {role}: {used:.0f} us CPU per job over the window (all threads)")
        print(f"  {cmd}")
        print("\n".join(summarise(path, args.top)))
    print("\n-- Redis INFO commandstats, per job (evalsha's time includes the commands its")
    print("   scripts call, which are listed too: 'all' counts them twice)")
    print(f"  {'command':<28} {'calls/job':>9} {'us/call':>8} {'us/job':>7}")
    for name, (calls, usec) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<28} {calls / jobs:9.2f} {usec / max(calls, 1):8.1f} {usec / jobs:7.1f}")
    print(f"  {'all':<28} {sum(c for c, _ in stats.values()) / jobs:9.2f} {'':>8} "
          f"{sum(u for _, u in stats.values()) / jobs:7.1f}")  # fmt: skip
    print("\n-- PostgreSQL, this database, per job")
    print(f"  transactions committed {(xacts_after[0] - xacts_before[0]) / jobs:.2f}, "
          f"rolled back {(xacts_after[1] - xacts_before[1]) / jobs:.2f}")  # fmt: skip
    print(f"  {'table':<22} {'inserted':>9} {'updated':>9} {'HOT':>9} {'deleted':>9}")
    for table, after in sorted(writes_after.items()):
        before = writes_before.get(table, (0, 0, 0, 0))
        delta = [(a - b) / jobs for a, b in zip(after, before, strict=True)]
        if any(delta):
            print(f"  {table:<22} " + " ".join(f"{d:9.2f}" for d in delta))
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

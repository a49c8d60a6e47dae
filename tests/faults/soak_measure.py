"""What the soak (tests/faults/soak.py) measures: the ledger read as it grows, which accepted jobs
reached a final state, memory (RSS) of the processes, the job log's size, and dispatch->start
latency percentiles."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections import defaultdict
from pathlib import Path

import psycopg
import redis

from jobyard.dispatcher import get_job
from jobyard.queue import keys
from tests.faults.ledger import Execution, Ledger, StepHistory, fold
from tests.faults.procs import descendant_pids

TERMINAL = ("succeeded", "failed", "dead", "cancelled")


class GrowingLedger(Ledger):
    """The fault ledger, read incrementally: each call folds in only the lines appended since
    the last one (an hour's ledger is hundreds of thousands of lines)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._offset = 0
        self._rest = b""
        self._out: dict[str, dict[str, StepHistory]] = defaultdict(lambda: defaultdict(StepHistory))
        self._open: dict[tuple[str, str, int], Execution] = {}
        self._lock = threading.Lock()

    def histories(self) -> dict[str, dict[str, StepHistory]]:
        with self._lock:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            self._offset += len(data)
            complete, _, self._rest = (self._rest + data).rpartition(b"\n")
            lines = complete.decode(errors="replace").splitlines()
            fold([json.loads(x) for x in lines if x.endswith("}")], self._out, self._open)
            return self._out


class Finality:
    """Accepted jobs until the job log (or, at the end, their engine) says they are final."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.pending: dict[str, float] = {}  # job id -> unix s dispatched
        self.final = 0
        #: job id -> what its engine said ("<engine> <state>"): final there when the job log
        #: still had it unfinished after the settle (see `poll_engines`)
        self.engine_only: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def final_by_engine_only(self) -> int:
        return len(self.engine_only)

    def add(self, job_id: str, at: float) -> None:
        with self._lock:
            self.pending[job_id] = at

    def poll_log(self) -> bool:
        """Drop the jobs the job log has final; False when the database did not answer."""
        with self._lock:
            ids = list(self.pending)
        done = final_in_log(self.database_url, ids)
        if done is None:
            return False
        self._drop(list(done))
        return True

    def poll_engines(self, budget: float) -> None:
        """Ask the engines (get_job) about the jobs the job log does not have final, for
        `budget` seconds at most (a query to a Temporal without workers waits). Those final
        there are kept in `engine_only`: their ending had not reached the job log."""
        with self._lock:
            ids = list(self.pending)
        done = []
        deadline = time.monotonic() + budget
        for job_id in ids:
            if time.monotonic() > deadline:
                break
            with contextlib.suppress(Exception):
                status = get_job(job_id)
                if status.state in TERMINAL:
                    done.append(job_id)
                    self.engine_only[job_id] = f"{status.engine} {status.state}"
        self._drop(done)

    def _drop(self, ids: list[str]) -> None:
        with self._lock:
            for job_id in ids:
                if self.pending.pop(job_id, None) is not None:
                    self.final += 1

    def late(self, now: float, older_than: float) -> int:
        with self._lock:
            return sum(1 for at in self.pending.values() if at < now - older_than)


def final_in_log(database_url: str, ids: list[str]) -> set[str] | None:
    """Those of `ids` the job log has in a final state; None when the database did not answer."""
    done: set[str] = set()
    try:
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            for i in range(0, len(ids), 5000):
                rows = conn.execute(
                    "SELECT job_id FROM job_log WHERE job_id = ANY(%s) AND state = ANY(%s)",
                    (ids[i : i + 5000], list(TERMINAL)),
                ).fetchall()
                done.update(r[0] for r in rows)
    except psycopg.Error:
        return None
    return done


def unfinished_ticks(database_url: str, job: str) -> list[str]:
    """Job ids of the scheduled jobs the job log has, not final ([] when unreadable)."""
    try:
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT job_id FROM job_log WHERE name = %s AND state <> ALL(%s)",
                (job, list(TERMINAL)),
            ).fetchall()
    except psycopg.Error:
        return []
    return [r[0] for r in rows]


def job_record(database_url: str, redis_url: str, job_id: str) -> list[str]:
    """Everything the system holds about one job, as lines: what get_job answers (the
    engines), its Redis hash and recorded steps, its job log row, its events in order, its
    schedule tick row if it is one, and the step results kept in the database."""
    out = []
    try:
        out.append(f"get_job: {get_job(job_id).as_dict()}")
    except Exception as exc:
        out.append(f"get_job: raised {exc!r}")
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        out.append(f"redis job hash: {_short(client.hgetall(keys.job(job_id)))}")
        out.append(f"redis steps: {_short(client.hgetall(keys.steps(job_id)))}")
    except redis.RedisError as exc:
        out.append(f"redis: {exc!r}")
    finally:
        client.close()
    queries = [
        ("job log row", "SELECT * FROM job_log WHERE job_id = %s"),
        ("event", "SELECT * FROM job_events WHERE job_id = %s ORDER BY seq"),
        ("schedule tick", "SELECT * FROM schedule_ticks WHERE job_id = %s"),
        ("kept step", "SELECT * FROM job_steps WHERE job_id = %s"),
    ]
    try:
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            for what, sql in queries:
                try:
                    with conn.transaction():
                        cursor = conn.execute(sql, (job_id,))
                        names = [c.name for c in cursor.description or []]
                        rows = cursor.fetchall()
                except psycopg.Error as exc:  # a table this schema lacks
                    out.append(f"{what}: {type(exc).__name__}")
                    continue
                if not rows:
                    out.append(f"{what}: none")
                for row in rows:
                    fields = {n: v for n, v in zip(names, row, strict=True) if v is not None}
                    fields.pop("job_id", None)
                    out.append(f"{what}: {_short(fields)}")
    except psycopg.Error as exc:
        out.append(f"database: {exc!r}")
    return out


def _short(value: object, limit: int = 1500) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def ticks(database_url: str, job: str) -> tuple[int, int] | None:
    """(scheduled jobs in the job log, of them not final); None when the database is away."""
    try:
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE state <> ALL(%s))"
                " FROM job_log WHERE name = %s",
                (list(TERMINAL), job),
            ).fetchone()
    except psycopg.Error:
        return None
    return (row[0], row[1]) if row else (0, 0)


def rss_mb(pid: int) -> float:
    """A process's resident set in MB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def pss_mb(pid: int) -> float:
    """A process's proportional set in MB: shared pages (PostgreSQL's shared buffers) divided
    among the processes that map them, so a sum over backends counts them once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def anon_mb(pid: int) -> float:
    """A process's anonymous resident memory in MB (its heap, not its mapped code); 0 when
    it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def tree_rss_mb(pid: int) -> tuple[float, int]:
    """RSS of a process and all its descendants, MB, and how many processes that is."""
    pids = [pid, *descendant_pids(pid)]
    return sum(rss_mb(p) for p in pids), len(pids)


def redis_rss_mb(url: str) -> float | None:
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return int(client.info("memory")["used_memory_rss"]) / 2**20
    except redis.RedisError:
        return None
    finally:
        client.close()


def postgres(database_url: str) -> dict[str, float] | None:
    """RSS of the PostgreSQL backends serving the soak's database (shared buffers they touched
    included), how many, and the job log's size on disk and row counts."""
    name = database_url.rpartition("/")[2]
    try:
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            pids = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)
            ).fetchall()
            size = conn.execute(
                "SELECT pg_total_relation_size('job_log') + pg_total_relation_size('job_events'),"
                " (SELECT count(*) FROM job_log), (SELECT count(*) FROM job_events)"
            ).fetchone()
    except psycopg.Error:
        return None
    assert size is not None
    return {
        "rss_mb": sum(rss_mb(p[0]) for p in pids),
        "pss_mb": sum(pss_mb(p[0]) for p in pids),
        "backends": len(pids),
        "joblog_mb": size[0] / 2**20,
        "jobs": size[1],
        "events": size[2],
    }


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

"""`make soak` (issue 29, item 7): a steady mixed load for an hour, a fault from the `make chaos`
table every five minutes, a report every ten minutes, and the targets checked at the end.

    SOAK_MINUTES=6 python -m tests.faults.soak   # short: a fault every 90 s, a report every 60 s

Environment (all optional): SOAK_MINUTES (60), SOAK_RATE (jobs dispatched per second, 20),
SOAK_FAULT_EVERY and SOAK_REPORT_EVERY (seconds; by default 1/12 of the run but at least 90, and
1/6 of the run but at least 60),
SOAK_SETTLE (seconds accepted jobs get to finish after the load stops, 120), SOAK_SEED (1),
SOAK_FAULTS (comma-separated fault kinds of tests/faults/soak_faults.py; default all).
Stop a run early with SIGTERM to this process (`kill <pid>`): it still cleans up.

The world is the fault suite's: a private redis-server with AOF on a free port, real
`jobyard worker`s (2 processes for the default and scheduled queues, 1 for the witness queue) and
two `jobyard temporal-worker`s, a Temporal dev server on its own
database file (tests/faults/temporal_crash.CrashableTemporal: the dev server the fault rows kill),
and the job log in a private PostgreSQL database created on the local server and dropped after.

The load (dispatched from this process, no burst to catch up after a slow stretch): 50% jobs of
three steps (15% of all on the witness queue), 15% with a durable 2 s sleep, 10% whose second step
fails once (a retry), 5% that always fail (dead after 2 attempts), 10% of one 0.5 s step, 10% on
Temporal (a queue no Dramatiq worker serves: a 1.5 s sleep and a retried step), and a schedule
firing every 5 s. Every step
execution is recorded in the ledger (tests/faults/soak_jobs.py), which the counters read.

The faults, one every SOAK_FAULT_EVERY seconds from the first interval on, are in
tests/faults/soak_faults.py: picked in rounds of every kind once, each round shuffled by the seed.

Targets, printed PASS/FAIL at the end (exit status 1 if any fails):
- lost 0: every accepted job and every schedule tick final in the job log within SOAK_SETTLE after
  the load stops (a job final in its engine whose ending has not reached the job log 30 s later
  counts too: its record is lost); each job counted is printed in full;
- ran on both engines 0 and returned steps re-run 0, as `make chaos` counts them (docs/faults.md);
- worker RSS growth under 10% from the end of the first report window ("minute 10") to the end
  of the load ("minute 60"), of the witnesses: the `jobyard worker` of the witness queue
  (supervisor + process) and one of the two temporal workers, which no fault targets (a worker a
  fault restarts starts its memory again); the others' RSS is in every report;
- p99 drift under 20%: drift = p99 of the last report window / p99 of the second window - 1, of
  dispatch->first step START over "quiet" jobs dispatched to Dramatiq (neither during a fault nor
  from 10 s before it to 30 s after it); the first window is warm-up; a drop in latency passes.
  The drift of all quiet jobs and of those on Temporal is printed beside it, not a target: the
  10% on Temporal set the all-jobs p99, and their tail is the Temporal dev server's.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobyard.queue import keys
from tests.faults import soak_faults
from tests.faults.poison import DEATH_WINDOW, returned_as_poison_killed
from tests.faults.procs import Cluster, descendant_pids
from tests.faults.scenarios import Load
from tests.faults.soak_jobs import LEDGER_ENV, MARKERS_ENV, WITNESS_QUEUE
from tests.faults.soak_measure import (
    Finality,
    GrowingLedger,
    anon_mb,
    final_in_log,
    job_record,
    percentile,
    postgres,
    redis_rss_mb,
    rss_mb,
    ticks,
    tree_rss_mb,
    unfinished_ticks,
)
from tests.support import Proc, wait_for

JOB_MODULES = "tests.faults.jobs,tests.faults.poison,tests.faults.soak_jobs"
#: A dispatch this many seconds before a fault began or after it ended is not "quiet" (left out
#: of the drift): it was queued or in flight when the fault hit, or dispatched while the system
#: recovered (heartbeats time out in 10 s, the rescue passes every 5 s).
BEFORE, RECOVERY = 10.0, 30.0
#: The trees no fault restarts, whose RSS growth is a target (see the module docstring).
WITNESSES = ("witness", "temporal-witness")
#: A job not final this long after its dispatch is reported late (lost, if it stays so).
LATE_AFTER = 120.0
#: Seconds the verdict still looks for the endings of jobs final only in their engine: one
#: that arrives is a job log lagging past the settle, one that does not an ending lost.
LOG_LAG_WAIT = 30.0


@dataclass(frozen=True)
class Config:
    minutes: float
    rate: float
    fault_every: float
    report_every: float
    settle: float
    seed: int
    faults: list[str]

    @classmethod
    def from_env(cls) -> Config:
        minutes = float(os.environ.get("SOAK_MINUTES", "60"))
        total = minutes * 60
        kinds = [k for k in os.environ.get("SOAK_FAULTS", "").split(",") if k]
        unknown = set(kinds) - set(soak_faults.KINDS)
        if unknown:
            raise SystemExit(f"SOAK_FAULTS: unknown {sorted(unknown)}; kinds: {soak_faults.KINDS}")
        return cls(
            minutes=minutes,
            rate=float(os.environ.get("SOAK_RATE", "20")),
            fault_every=float(os.environ.get("SOAK_FAULT_EVERY", max(90.0, total / 12))),
            report_every=float(os.environ.get("SOAK_REPORT_EVERY", max(60.0, total / 6))),
            settle=float(os.environ.get("SOAK_SETTLE", "120")),
            seed=int(os.environ.get("SOAK_SEED", "1")),
            faults=kinds or list(soak_faults.KINDS),
        )


@dataclass(frozen=True)
class Kind:
    name: str
    job: str
    weight: int
    payload: dict[str, Any]


MIX = [
    Kind("steps", "soak.chain", 35, {"steps": 3}),
    Kind("witness", "soak.witness", 15, {"steps": 3}),
    Kind("sleep", "soak.chain", 15, {"steps": 2, "sleep": 2.0}),
    Kind("retry", "soak.chain", 10, {"steps": 3, "fail_step": 1}),
    Kind("fail", "soak.fail", 5, {"steps": 2, "fail_step": 1, "fail_mode": "fail"}),
    Kind("slow", "soak.chain", 10, {"steps": 1, "work": 0.5}),
    Kind("temporal", "soak.temporal", 10, {"steps": 3, "sleep": 1.5, "fail_step": 2}),
]


@dataclass
class FaultRecord:
    kind: str
    began: float  # unix s
    ended: float
    what: str


@dataclass
class Window:
    """One report: its measurements, for the table and the targets."""

    minute: float
    rss_mb: dict[str, float]  # "worker", "witness", "temporal-worker", "temporal-witness"
    #: the same keys: which processes they were (the tree: `jobyard temporal-worker` supervises
    #: a child, and a restarted child is another process under the same supervisor)
    pids: dict[str, tuple[int, ...]]
    p99: dict[str, float | None]  # quiet jobs' dispatch->start p99: "quiet", by engine
    line: str = ""
    #: the witnesses' processes: name -> pid -> RSS MB (the supervisor first): which process
    #: of a tree grew
    by_process: dict[str, dict[int, float]] = field(default_factory=dict)


class SoakCluster(Cluster):
    worker_queues = "default,scheduled"


def start_witness(cluster: Cluster) -> Proc:
    """The witness `jobyard worker`: one process, its own queue, started and waited for."""
    proc = cluster.start_worker(1, queues=WITNESS_QUEUE, wait=False)
    client = cluster.redis.client()
    try:
        wait_for(lambda: client.zcard(keys.workers(WITNESS_QUEUE)) > 0, timeout=120)
    finally:
        client.close()
    return proc


@dataclass
class Soak:
    config: Config
    world: soak_faults.World
    ledger: GrowingLedger
    loads: dict[str, Load]
    finality: Finality
    began: float = field(default_factory=time.time)
    faults: list[FaultRecord] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    unexpected_exits: int = 0

    # --- the load ---------------------------------------------------------------------------

    def feed(self, rate: float, seed: int, counter: itertools.count[int]) -> None:
        rng = random.Random(seed)
        weights = [k.weight for k in MIX]
        next_at = time.monotonic()
        while not self.stop.is_set():
            kind = rng.choices(MIX, weights)[0]
            self.dispatch(kind, f"{kind.name}-{next(counter)}")
            next_at = max(next_at + 1 / rate, time.monotonic())  # no burst after a slow stretch
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def dispatch(self, kind: Kind, tag: str) -> None:
        """One job; an unknown outcome is dispatched again with its job id, as its caller is
        told to (a duplicate then, or a first start), up to five times a second apart."""
        load = self.loads[kind.job]
        attempt = load.dispatch(tag, **kind.payload)
        for _ in range(5):
            if attempt.error != "DispatchOutcomeUnknownError" or not attempt.job_id:
                break
            self.stop.wait(1)
            attempt = load.dispatch(tag, job_id=attempt.job_id, **kind.payload)
        if attempt.handle is not None and attempt.job_id:
            self.finality.add(attempt.job_id, attempt.at)

    def start_feeders(self, threads: int = 4) -> list[threading.Thread]:
        counter = itertools.count()
        out = []
        for i in range(threads):
            args = (self.config.rate / threads, self.config.seed * 100 + i, counter)
            t = threading.Thread(target=self.feed, args=args, daemon=True, name=f"feed-{i}")
            t.start()
            out.append(t)
        return out

    # --- faults -----------------------------------------------------------------------------

    def inject(self, kind: str) -> None:
        began = time.time()
        try:
            what = soak_faults.KINDS[kind](self.world)
        except Exception as exc:
            traceback.print_exc()
            what = f"the fault itself failed: {exc!r}"
        record = FaultRecord(kind, began, time.time(), what)
        self.faults.append(record)
        say(self, f"FAULT {len(self.faults)} {kind}: {what} ({record.ended - began:.1f} s)")

    def keep_workers_up(self) -> None:
        """A worker that died outside a fault (a poison run on Temporal, a crash) is started
        again, and counted: the soak goes on, the report says so."""
        w = self.world
        if w.worker.proc.poll() is not None:
            self.unexpected_exits += 1
            say(self, f"jobyard worker exited ({w.worker.proc.returncode}) outside a fault")
            w.worker = w.cluster.start_worker()
        if w.temporal_worker.proc.poll() is not None:
            self.unexpected_exits += 1
            say(self, f"temporal worker exited ({w.temporal_worker.proc.returncode})")
            w.temporal_worker = w.cluster.start_temporal_worker()
        if w.witness.proc.poll() is not None:  # its growth figure is then not the whole run's
            self.unexpected_exits += 1
            say(self, f"witness worker exited ({w.witness.proc.returncode})")
            w.witness = start_witness(w.cluster)
        if w.temporal_witness.proc.poll() is not None:
            self.unexpected_exits += 1
            say(self, f"witness temporal worker exited ({w.temporal_witness.proc.returncode})")
            w.temporal_witness = w.cluster.start_temporal_worker()

    # --- reports ----------------------------------------------------------------------------

    def quiet(self, at: float) -> bool:
        return not any(f.began - BEFORE <= at <= f.ended + RECOVERY for f in self.faults)

    def latencies(self, since: float, until: float) -> dict[str, list[float]]:
        """Seconds from dispatch to the first step's first START, for jobs accepted in
        [since, until): "all", the "quiet" ones, those split by engine, and how long the quiet
        ones' dispatch calls took ("call"). A job not started yet counts with the time it has
        waited so far (a lower bound)."""
        histories = self.ledger.histories()
        now = time.time()
        out: dict[str, list[float]] = {"all": [], "quiet": [], "call": []}
        for load in self.loads.values():
            for a in list(load.attempts):
                if a.handle is None or not since <= a.at < until:
                    continue
                s0 = histories.get(a.tag, {}).get("s0")
                waited = (s0.executions[0].started if s0 and s0.executions else now) - a.at
                out["all"].append(waited)
                if self.quiet(a.at):
                    out["quiet"].append(waited)
                    out.setdefault(str(a.handle.engine), []).append(waited)
                    out["call"].append(a.seconds)
        return out

    def report(self, since: float, until: float, label: str) -> Window:
        self.finality.poll_log()
        w = self.world
        procs = {"worker": w.worker, "witness": w.witness, "temporal-worker": w.temporal_worker,
                 "temporal-witness": w.temporal_witness}  # fmt: skip
        rss = {name: tree_rss_mb(proc.pid) for name, proc in procs.items()}
        redis_mb = redis_rss_mb(w.cluster.redis.url)
        pg = postgres(w.database_url) or {}  # {} while the database is away
        lat = self.latencies(since, until)
        every, quiet = lat["all"], lat["quiet"]
        by_engine = ", ".join(
            f"{engine} n={len(lat[engine])} p99 {_ms(percentile(lat[engine], 99))}"
            for engine in ("dramatiq", "temporal")
            if engine in lat
        )
        counts = self.ledger.counts()
        cut = returned_as_poison_killed(self.ledger.histories())
        attempts = [a for load in self.loads.values() for a in load.attempts]
        dispatched = len({a.tag for a in attempts})
        accepted = len({a.tag for a in attempts if a.handle is not None})
        tick = ticks(w.database_url, "soak.tick")
        p99_quiet = percentile(quiet, 99)
        minute = (until - self.began) / 60
        lines = [
            f"== {label} at minute {minute:.1f}: dispatched {dispatched}, accepted {accepted},"
            f" refused {dispatched - accepted}, final {self.finality.final},"
            f" in flight {len(self.finality.pending)},"
            f" late (> {LATE_AFTER:g} s) {self.finality.late(time.time(), LATE_AFTER)};"
            f" schedule ticks {_ticks(tick)}",
            "   memory RSS MB: "
            + ", ".join(f"{name} {mb:.1f} ({n} processes)" for name, (mb, n) in rss.items())
            + f", redis {_mb(redis_mb)}, postgres {_mb(pg.get('rss_mb'))}"
            f" (PSS {_mb(pg.get('pss_mb'))}; {pg.get('backends')} backends of the db)",
            f"   job log: {_mb(pg.get('joblog_mb'))} MB on disk, {pg.get('jobs')} jobs,"
            f" {pg.get('events')} events",
            f"   dispatch->start ms, jobs dispatched in this window: n={len(every)}"
            f" p50 {_ms(percentile(every, 50))} p99 {_ms(percentile(every, 99))};"
            f" quiet n={len(quiet)} p50 {_ms(percentile(quiet, 50))} p99 {_ms(p99_quiet)}"
            f" (by engine: {by_engine}; the dispatch call alone p99"
            f" {_ms(percentile(lat['call'], 99))})",
            f"   faults so far {len(self.faults)} (worker restarts outside faults"
            f" {self.unexpected_exits}): lost (late) {self.finality.late(time.time(), LATE_AFTER)},"
            f" ran on both engines {counts.both_engines}, returned steps re-run"
            f" {counts.rerun_returned - cut} (+{cut} returned as a poison killed their process,"
            f" allowed), steps re-run after a failure or interruption (allowed)"
            f" {counts.rerun_interrupted},"
            f" handed over {counts.handed_over}",
        ]
        trees = {k: (p.pid, *sorted(descendant_pids(p.pid))) for k, p in procs.items()}
        by_process = {name: {pid: rss_mb(pid) for pid in trees[name]} for name in WITNESSES}
        lines.append(
            "   witness processes, RSS/anonymous MB by pid (the supervisor first): "
            + "; ".join(
                f"{name} "
                + ", ".join(f"{pid} {mb:.1f}/{anon_mb(pid):.1f}" for pid, mb in pids.items())
                for name, pids in by_process.items()
            )
        )
        print("\n".join(lines), flush=True)
        p99 = {k: percentile(lat.get(k, []), 99) for k in ("quiet", "dramatiq", "temporal")}
        mbs = {k: mb for k, (mb, _) in rss.items()}
        window = Window(minute, mbs, trees, p99, line=lines[0], by_process=by_process)
        self.windows.append(window)
        return window


def _mb(value: float | None) -> str:
    return "down" if value is None else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _ticks(tick: tuple[int, int] | None) -> str:
    return "unreadable" if tick is None else f"{tick[0]} fired, {tick[1]} not final"


def say(soak: Soak, message: str) -> None:
    print(f"[{(time.time() - soak.began) / 60:5.1f} min] {message}", flush=True)


def run(soak: Soak) -> None:
    """The load, the faults and the reports on their clocks, for the configured minutes."""
    c = soak.config
    total = c.minutes * 60
    feeders = soak.start_feeders()
    kinds = soak_faults.picks(c.faults, c.seed)
    reporter = threading.Thread(target=_reports, args=(soak, total), daemon=True)
    reporter.start()
    start = time.monotonic()
    for k in itertools.count(1):
        at = k * c.fault_every
        if at >= total:
            break
        _sleep_until(soak, start + at)
        soak.inject(next(kinds))
    _sleep_until(soak, start + total)
    soak.stop.set()
    for t in feeders:
        t.join(60)
    reporter.join()


def _sleep_until(soak: Soak, deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 5))
        soak.keep_workers_up()


def _reports(soak: Soak, total: float) -> None:
    begin = time.monotonic()
    for k in itertools.count(1):
        at = min(k * soak.config.report_every, total)
        time.sleep(max(0.0, begin + at - time.monotonic()))
        since = soak.began + (k - 1) * soak.config.report_every
        try:
            soak.report(since, soak.began + at, f"report {k}")
        except Exception:
            traceback.print_exc()
        if at >= total:
            return


def verdict(soak: Soak) -> bool:
    """Settle, count what never finished, and print each target PASS or FAIL."""
    say(soak, f"load stopped; up to {soak.config.settle:g} s for accepted jobs to finish")
    for a in soak.world.poison.attempts:  # the poison jobs too: they must end dead
        if a.handle is not None and a.job_id:
            soak.finality.add(a.job_id, a.at)
    deadline = time.monotonic() + soak.config.settle
    while soak.finality.pending and time.monotonic() < deadline:
        soak.finality.poll_log()
        _sleep_until(soak, time.monotonic() + 5)
    soak.finality.poll_log()
    soak.finality.poll_engines(budget=60)
    say(soak, f"{len(soak.finality.pending)} accepted jobs not final")
    late_in_log = _wait_for_log(soak, list(soak.finality.engine_only), LOG_LAG_WAIT)
    tick = ticks(soak.world.database_url, "soak.tick")
    unfinished = unfinished_ticks(soak.world.database_url, "soak.tick")
    # A job final in its engine whose ending never reached the job log lost its record there.
    endings_lost = len(soak.finality.engine_only) - len(late_in_log)
    lost = len(soak.finality.pending) + (tick[1] if tick else 0) + endings_lost
    counts = soak.ledger.counts()
    cut = returned_as_poison_killed(soak.ledger.histories())  # promise 3's window, allowed
    checks = [
        (lost == 0 and tick is not None, f"lost: {lost} (accepted jobs {len(soak.finality.pending)}"
         f", schedule ticks {_ticks(tick)}, endings final in their engine and never in the job"
         f" log {endings_lost}; {len(late_in_log)} more in the job log after the settle)"),
        (counts.both_engines == 0, f"ran on both engines: {counts.both_engines}"
         f" (clean handoffs, not counted: {counts.handed_over})"),
        (counts.rerun_returned - cut == 0, f"returned steps re-run: {counts.rerun_returned - cut}"
         f" (allowed: {cut} returned as a poison killed their process, within"
         f" {DEATH_WINDOW:g} s; {counts.rerun_interrupted} after a failure or interruption)"),
        *_growth_checks(soak.windows),
        _drift_check(soak.windows),
    ]  # fmt: skip
    print("\n== soak verdict")
    for i, f in enumerate(soak.faults, 1):
        print(f"   fault {i} at minute {(f.began - soak.began) / 60:.1f}: {f.kind}: {f.what}")
    print(f"   {_outcomes(soak)}; {_tracebacks(soak)}")
    # A restart resets a worker's RSS: the growth targets are read with these in mind.
    print(f"   worker restarts by faults {soak.world.restarts or 0}, outside faults"
          f" {soak.unexpected_exits}")  # fmt: skip
    for w in soak.windows:
        print(f"   {w.line}")
    _print_records(soak, late_in_log, unfinished)
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    passed = all(ok for ok, _ in checks)
    print("SOAK PASS" if passed else "SOAK FAIL", flush=True)
    return passed


def _wait_for_log(soak: Soak, ids: list[str], seconds: float) -> dict[str, float]:
    """For the jobs final in their engine and not in the job log: the seconds after the
    settle at which the job log had them final after all (a lagging log, not a lost ending),
    looking every second for `seconds`."""
    began, found = time.monotonic(), dict[str, float]()
    while ids and time.monotonic() - began < seconds:
        done = final_in_log(soak.world.database_url, [i for i in ids if i not in found]) or set()
        found |= {job_id: time.monotonic() - began for job_id in done}
        if len(found) == len(ids):
            break
        time.sleep(1)
    return found


def _print_records(soak: Soak, late_in_log: dict[str, float], ticks: list[str]) -> None:
    """Every job the verdict counts against "lost", in full, so that a run names its cause:
    accepted jobs final nowhere, jobs final only in their engine, scheduled jobs not final in
    the job log. For each: its dispatch (tag, when, the engine that took it), the faults near
    it, what each engine and the job log hold (soak_measure.job_record), and its step
    executions in the ledger."""
    w = soak.world
    attempts = {a.job_id: a for load in soak.loads.values() for a in load.attempts if a.job_id}
    attempts |= {a.job_id: a for a in w.poison.attempts if a.job_id}
    histories = soak.ledger.histories()
    cases = [(job_id, "final nowhere") for job_id in soak.finality.pending]
    for job_id, said in soak.finality.engine_only.items():
        lag = late_in_log.get(job_id)
        arrived = (
            f"in the job log {lag:.0f} s after the settle"
            if lag is not None
            else f"still not in the job log {LOG_LAG_WAIT:g} s after the settle"
        )
        cases.append((job_id, f"final only in its engine ({said}); {arrived}"))
    cases += [(job_id, "scheduled job not final in the job log") for job_id in ticks]
    if not cases:
        return
    print(f"\n== {len(cases)} job(s) counted against lost, in full")
    for job_id, why in cases:
        print(f"-- {job_id}: {why}")
        a = attempts.get(job_id)
        at = a.at if a is not None else None
        if a is not None:
            engine = a.handle.engine if a.handle is not None else a.error
            reason = a.handle.fallback_reason if a.handle is not None else None
            print(f"   dispatched {a.tag} at minute {(a.at - soak.began) / 60:.2f}"
                  f" ({engine}, fallback {reason}, call {a.seconds * 1000:.0f} ms)")  # fmt: skip
        for f in soak.faults:
            if at is None or f.began - 120 <= at <= f.ended + 120:
                print(f"   fault at minute {(f.began - soak.began) / 60:.2f}: {f.kind}: {f.what}")
        for line in job_record(w.database_url, w.cluster.redis.url, job_id):
            print(f"   {line}")
        tag = a.tag if a is not None else job_id  # a tick's steps are tagged with its id
        for step, history in sorted(histories.get(tag, {}).items()):
            runs = ", ".join(
                f"{e.engine} pid {e.pid} at minute {(e.started - soak.began) / 60:.2f}"
                f" {'failed' if e.failed else 'returned' if e.ended else 'no end'}"
                for e in history.executions
            )
            print(f"   step {step}: {runs}")


def _outcomes(soak: Soak) -> str:
    """Dispatch outcomes by engine or error class, over the whole run."""
    seen: dict[str, int] = {}
    for load in soak.loads.values():
        for a in load.attempts:
            key = a.handle.engine if a.handle is not None else (a.error or "?")
            seen[str(key)] = seen.get(str(key), 0) + 1
    return "dispatches: " + ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))


def _tracebacks(soak: Soak) -> str:
    """Tracebacks in the workers' logs (rule 4 of issue 29: an expected fault logs one line)."""
    counts = [p.output().count("Traceback") for p in soak.world.cluster.procs]
    return f"tracebacks in the {len(counts)} worker process logs: {sum(counts)}"


def _growth_checks(windows: list[Window]) -> list[tuple[bool, str]]:
    if len(windows) < 2:
        return [(False, "worker RSS growth: fewer than two reports")]
    first, last = windows[0], windows[-1]
    span = f"minute {first.minute:.0f} -> {last.minute:.0f}"
    out = []
    for name, what in [("witness", "jobyard worker"), ("temporal-witness", "temporal worker")]:
        a, b = first.rss_mb[name], last.rss_mb[name]
        growth = b / a - 1 if a else float("inf")
        text = f"{what} RSS growth {span}: {growth:+.1%} ({a:.1f} -> {b:.1f} MB), target < 10%"
        same = first.pids[name] == last.pids[name]
        if not same:  # a crash outside the faults restarted it: two processes' memory
            text += f"; NOT MEASURED: the {name} was restarted outside a fault"
        else:
            before, after = first.by_process.get(name, {}), last.by_process.get(name, {})
            text += (
                " (by process: "
                + ", ".join(
                    f"{pid} {mb:.1f} -> {after.get(pid, 0.0):.1f}" for pid, mb in before.items()
                )
                + ")"
            )
        out.append((same and growth < 0.10, text + f" (the {name}, which no fault restarts)"))
    return out


def _drift_check(windows: list[Window]) -> tuple[bool, str]:
    """The target is on jobs dispatched to Dramatiq (the main path); the drift of all quiet
    jobs and of Temporal's (the dev server's own latency, a tail that sets the all-jobs p99 as
    their 10% exceeds 1%) are printed beside it."""
    if len(windows) < 3:
        return False, "p99 drift: needs 3 reports"
    drifts = {k: _drift(windows[1].p99[k], windows[-1].p99[k]) for k in windows[1].p99}
    ok = drifts["dramatiq"] is not None and drifts["dramatiq"][0] < 0.20
    shown = {k: _shown(d) for k, d in drifts.items()}
    return ok, (
        f"p99 drift, quiet jobs on Dramatiq: {shown['dramatiq']}, target < +20%"
        f" (window 2 -> last window, dispatch->first step START; for information: all quiet"
        f" jobs {shown['quiet']}, on Temporal {shown['temporal']})"
    )


def _shown(drift: tuple[float, float, float] | None) -> str:
    return "-" if drift is None else f"{drift[0]:+.1%} ({drift[1]:.0f} -> {drift[2]:.0f} ms)"


def _drift(base: float | None, last: float | None) -> tuple[float, float, float] | None:
    """(last / base - 1, base ms, last ms); None without both."""
    if not base or last is None:
        return None
    return last / base - 1, base * 1000, last * 1000


def main() -> int:
    from jobyard.job_engine.db.migrate import upgrade
    from tests.faults.temporal_crash import CrashableTemporal
    from tests.support import create_pg_database, drop_pg_database

    config = Config.from_env()
    workdir = Path(tempfile.mkdtemp(prefix="jobyard-soak-"))
    (workdir / "markers").mkdir()
    (workdir / "logs").mkdir()
    print(f"soak: {config}\n   workdir {workdir}", flush=True)
    database_url = create_pg_database("jobyard_soak")
    upgrade(database_url)
    temporal = CrashableTemporal(workdir / "temporal.db").start()
    ledger = GrowingLedger(workdir / "soak.ledger")
    env = {
        "JOBYARD_JOB_MODULES": JOB_MODULES,
        LEDGER_ENV: str(ledger.path),
        MARKERS_ENV: str(workdir / "markers"),
    }
    cluster = SoakCluster(temporal.address, database_url, env=env, logdir=workdir / "logs")
    try:
        worker, temporal_worker = cluster.start_both()
        temporal_witness = cluster.start_temporal_worker(wait=False)
        witness = start_witness(cluster)
        cluster.wait_ready(temporal_witness)
        loads = {k.job: Load(ledger, job=k.job) for k in MIX}
        world = soak_faults.World(
            cluster, worker, temporal_worker, witness, temporal_witness, temporal, database_url,
            poison=Load(ledger, job="faults.poison"),
        )  # fmt: skip
        soak = Soak(config, world, ledger, loads, Finality(database_url))
        say(soak, f"workers up (worker pid {worker.pid}, temporal worker pid"
                  f" {temporal_worker.pid}); load {config.rate:g} jobs/s, faults in order of"
                  f" {config.faults} shuffled by seed {config.seed}")  # fmt: skip
        run(soak)
        return 0 if verdict(soak) else 1
    finally:
        cluster.close()
        temporal.stop()
        drop_pg_database(database_url)
        print(f"soak: ledger and process logs kept in {workdir}", flush=True)


def _stop_cleanly(signum: int, _frame: Any) -> None:
    """SIGTERM or SIGINT (which a detached `nohup ... &` run ignores otherwise): leave through
    main's `finally`, which stops the processes and drops the database."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop_cleanly)
    signal.signal(signal.SIGINT, _stop_cleanly)
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as tests/faults/run.py: skip finalisation of the Temporal client threads

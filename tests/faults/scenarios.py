"""One scenario per row of issue 11's fault table, each parameterised by counts and durations.

A scenario starts its own Redis and worker processes (tests/faults/procs.py), dispatches through
jobyard.dispatcher in this process, injects its fault, waits a bounded time for every accepted
job to reach a final state, and counts from the ledger (tests/faults/ledger.py). It returns a
Row; `Row.missed` lists the targets of "What must hold" that the row did not meet.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from jobyard.dispatcher import (
    JobHandle,
    JobStatus,
    cancel_job,
    dispatch_job,
    get_dispatcher,
    get_job,
)
from jobyard.queue import keys
from tests.faults.ledger import Ledger
from tests.faults.procs import Cluster, descendant_pids
from tests.support import free_port, wait_for

TERMINAL = ("succeeded", "failed", "dead", "cancelled")
NOT_STARTED_ID = re.compile(r"\(([A-Za-z0-9._:@/-]+)\) was not started")


@dataclass
class Harness:
    """What every scenario shares: the Temporal dev server, the job log database, a work
    directory for ledgers, and how long accepted jobs get to finish once the faults are over."""

    temporal_address: str
    database_url: str
    workdir: Path
    settle: float = 60.0
    processes: int = 2  # worker processes per `jobyard worker` (each runs 10 threads)

    def ledger(self, name: str) -> Ledger:
        slug = "".join(c if c.isalnum() else "-" for c in name)
        return Ledger(self.workdir / f"{slug}-{time.monotonic_ns()}.ledger")

    def cluster(self, **kwargs: Any) -> Cluster:
        """A scenario's Redis and processes; their output is kept in a folder of the workdir.
        With an SQLite job log, each scenario gets a database of its own: a job an earlier
        scenario left unfinished in the log is not in this scenario's Redis, and the rescue
        would dispatch it again here (as it must for a Redis that lost it), loading this row."""
        stamp = time.monotonic_ns()
        logdir = self.workdir / f"logs-{stamp}"
        logdir.mkdir()
        database_url = self.database_url
        if database_url.startswith("sqlite:"):
            template = self.workdir / "jobyard-migrated.db"
            if not template.exists():  # migrated once, copied per scenario
                from jobyard.job_engine.db.migrate import upgrade

                upgrade(f"sqlite:///{template}")
            fresh = self.workdir / f"jobyard-{stamp}.db"
            # SQLite's backup API: a file copy would miss what is still in the template's WAL.
            source, target = sqlite3.connect(template), sqlite3.connect(fresh)
            try:
                source.backup(target)
            finally:
                source.close()
                target.close()
            database_url = f"sqlite:///{fresh}"
        return Cluster(
            self.temporal_address, database_url, logdir=logdir,
            processes=self.processes, **kwargs,
        )  # fmt: skip


@dataclass
class Row:
    fault: str
    dispatched: int = 0
    accepted: int = 0
    completed: int = 0
    lost: int = 0
    both_engines: int = 0
    rerun_returned: int = 0
    rerun_interrupted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def require(self, ok: bool, target: str) -> None:
        if not ok:
            self.missed.append(target)


@dataclass
class Attempt:
    tag: str
    job_id: str | None
    at: float  # unix seconds when dispatch was called
    seconds: float  # how long dispatch took
    handle: JobHandle | None = None
    error: str | None = None  # the exception's class name when dispatch raised


class Load:
    """Dispatches tagged jobs and remembers every attempt; the tag is in the payload, so the
    ledger names the dispatch a step belongs to even when dispatch raised."""

    def __init__(self, ledger: Ledger, job: str = "faults.chain", **defaults: Any) -> None:
        self.ledger = ledger
        self.job = job
        self.defaults = defaults
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()

    def dispatch(
        self, tag: str, *, job_id: str | None = None, delay: float | None = None, **over: Any
    ) -> Attempt:
        payload = {"ledger": str(self.ledger.path), "tag": tag, **self.defaults, **over}
        started, at = time.monotonic(), time.time()
        attempt = Attempt(tag, job_id, at, 0.0)
        try:
            attempt.handle = dispatch_job(self.job, payload, job_id=job_id, delay=delay)
            attempt.job_id = attempt.handle.job_id
        except Exception as exc:
            attempt.error = type(exc).__name__
            named = NOT_STARTED_ID.search(str(exc))  # the id the dispatcher chose
            attempt.job_id = (
                attempt.job_id
                or getattr(exc, "job_id", None)
                or (named.group(1) if named else None)
            )
        attempt.seconds = time.monotonic() - started
        with self._lock:
            self.attempts.append(attempt)
        return attempt

    def dispatch_many(
        self,
        tags: Iterable[str],
        *,
        rate: float | None = None,
        threads: int = 1,
        own_ids: bool = False,
        delay: float | None = None,
        fields: Callable[[int], dict[str, Any]] | None = None,
        **over: Any,
    ) -> list[Attempt]:
        """Dispatch one job per tag, `rate` per second at most; `own_ids` uses the tag as job id;
        `fields(i)` adds payload fields of the i-th job (a tenant of its own, say)."""
        tags = list(tags)
        begin = time.monotonic()

        def one(i_tag: tuple[int, str]) -> Attempt:
            i, tag = i_tag
            if rate:
                time.sleep(max(0.0, begin + i / rate - time.monotonic()))
            mine = over | fields(i) if fields else over
            return self.dispatch(tag, job_id=tag if own_ids else None, delay=delay, **mine)

        if threads == 1:
            return [one(item) for item in enumerate(tags)]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, enumerate(tags)))

    def in_background(self, *args: Any, **kwargs: Any) -> threading.Thread:
        thread = threading.Thread(target=self.dispatch_many, args=args, kwargs=kwargs, daemon=True)
        thread.start()
        return thread

    def accepted(self) -> dict[str, str]:
        """tag -> job id of every dispatch that returned a handle."""
        return {a.tag: a.job_id for a in self.attempts if a.handle is not None and a.job_id}

    def refused(self) -> dict[str, str]:
        """tag -> error class of dispatches that raised (and were never accepted later)."""
        accepted = self.accepted()
        return {a.tag: a.error for a in self.attempts if a.error and a.tag not in accepted}


def status_of(job_id: str) -> JobStatus | None:
    try:
        return get_job(job_id)
    except Exception:
        return None


def wait_final(ids: dict[str, str], bound: float) -> dict[str, JobStatus]:
    """Poll until every job is final or `bound` seconds passed; tag -> final status."""
    pending, final = dict(ids), {}
    deadline = time.monotonic() + bound
    while pending:
        for tag, job_id in list(pending.items()):
            status = status_of(job_id)
            if status is not None and status.state in TERMINAL:
                final[tag] = status
                del pending[tag]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    say(f"{len(final)} of {len(ids)} jobs final, {len(pending)} not")
    for tag, job_id in list(pending.items())[:10]:  # what the ones not final look like
        status = status_of(job_id)
        seen = f"{status.state} on {status.engine}, attempts {status.attempts}" if status else "?"
        say(f"  not final: {tag} {job_id}: {seen}")
    return final


def ledger_wait(ledger: Ledger, predicate: Callable[[Ledger], bool], timeout: float) -> bool:
    try:
        wait_for(lambda: predicate(ledger), timeout=timeout, interval=0.1)
    except AssertionError:
        return False
    return True


def starts(ledger: Ledger, step: str | None = None) -> int:
    """Executions started so far (of `step`, or of any step)."""
    return sum(
        len(h.executions)
        for steps in ledger.histories().values()
        for name, h in steps.items()
        if step is None or name == step
    )


RULE_3 = "rule 3: a returned step never runs again"


def finish(fault: str, load: Load, final: dict[str, JobStatus]) -> Row:
    """The common columns and targets. A job moved mid-run from Dramatiq to Temporal by a clean
    handoff (the rule-5 move, see tests/faults/ledger.py) is not counted as ran on both engines;
    the row says how many there were (handed_over)."""
    accepted = load.accepted()
    counts = load.ledger.counts()
    row = Row(
        fault,
        dispatched=len({a.tag for a in load.attempts}),
        accepted=len(accepted),
        completed=sum(1 for t in accepted if t in final),
        lost=sum(1 for t in accepted if t not in final),
        both_engines=counts.both_engines,
        rerun_returned=counts.rerun_returned,
        rerun_interrupted=counts.rerun_interrupted,
    )
    if len(load.attempts) != row.dispatched:
        row.extra["dispatch_calls"] = len(load.attempts)
    if counts.handed_over:
        row.extra["handed_over"] = counts.handed_over
    not_ok = sum(1 for s in final.values() if s.state != "succeeded")
    if not_ok:
        row.extra["final_not_succeeded"] = not_ok
    row.require(row.lost == 0, "rule 1: nothing accepted is lost")
    row.require(row.both_engines == 0, "rule 2: a job id runs on one engine")
    row.require(row.rerun_returned == 0, RULE_3)
    return row


_began = time.monotonic()


def say(message: str) -> None:
    """A progress line on stderr, seconds since the scenario began (pytest shows it on failure)."""
    print(f"  [{time.monotonic() - _began:6.1f}s] {message}", file=sys.stderr, flush=True)


def _timed(fn: Callable[..., Row]) -> Callable[..., Row]:
    def run(*args: Any, **kwargs: Any) -> Row:
        global _began
        began = _began = time.monotonic()
        row = fn(*args, **kwargs)
        row.seconds = round(time.monotonic() - began, 1)
        return row

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


# --- Redis faults ------------------------------------------------------------------------------

WORKLOAD = {"steps": 3, "work": 0.05, "sleep": 1.5}  # three steps around a parked ctx.sleep


def _redis_crash(
    h: Harness, fault: str, *, aof: bool, n: int, rate: float, down: float, wipe: bool
) -> Row:
    ledger = h.ledger(fault)
    cluster = h.cluster(aof=aof)
    try:
        cluster.start_both()
        say("workers up")
        load = Load(ledger, **WORKLOAD)
        feeder = load.in_background([f"j{i}" for i in range(n)], rate=rate)
        wait_for(lambda: len(load.attempts) >= n // 2, timeout=120)
        cluster.redis.sigkill()
        say("redis SIGKILLed")
        time.sleep(down)
        if wipe:
            cluster.redis.wipe()
        cluster.redis.start()
        say("redis back")
        feeder.join()
        final = wait_final(load.accepted(), h.settle)
        row = finish(fault, load, final)
        if wipe:
            row.extra["not_found"] = sum(1 for j in load.accepted().values() if _not_found(j))
        return row
    finally:
        cluster.close()


def _not_found(job_id: str) -> bool:
    from jobyard.dispatcher import JobNotFoundError

    try:
        get_job(job_id)
    except JobNotFoundError:
        return True
    except Exception:
        return False
    return False


@_timed
def redis_sigkill_aof(h: Harness, n: int = 500, rate: float = 60, down: float = 2.0) -> Row:
    """Redis SIGKILLed mid-run, restarted with its AOF."""
    return _redis_crash(
        h, "redis SIGKILL + AOF restart", aof=True, n=n, rate=rate, down=down, wipe=False
    )


@_timed
def redis_restart_empty(h: Harness, n: int = 300, rate: float = 60, down: float = 1.0) -> Row:
    """Redis restarted empty: no persistence, or a failover to a replica that missed writes."""
    return _redis_crash(h, "redis restarted empty", aof=False, n=n, rate=rate, down=down, wipe=True)


@_timed
def redis_sigstop(h: Harness, n: int = 500, rate: float = 60, pause: float = 6.0) -> Row:
    """Redis SIGSTOPed for `pause` seconds mid-run."""
    fault = f"redis SIGSTOP {pause:g}s"
    ledger = h.ledger("sigstop")
    cluster = h.cluster(aof=True)
    try:
        cluster.start_both()
        say("workers up")
        load = Load(ledger, **WORKLOAD)
        feeder = load.in_background([f"j{i}" for i in range(n)], rate=rate)
        wait_for(lambda: len(load.attempts) >= n // 2, timeout=120)
        cluster.redis.pause()
        say("redis SIGSTOPped")
        time.sleep(pause)
        cluster.redis.resume()
        say("redis SIGCONTed")
        feeder.join()
        return finish(fault, load, wait_final(load.accepted(), h.settle))
    finally:
        cluster.close()


@_timed
def redispatch_during_outage(
    h: Harness, n_done: int = 150, n_new: int = 100, down: float = 10.0
) -> Row:
    """The same job_id dispatched again during a Redis outage, and again after recovery."""
    ledger = h.ledger("redispatch")
    cluster = h.cluster(aof=True)
    try:
        cluster.start_both()
        say("workers up")
        load = Load(ledger, steps=2, work=0.05)
        done_tags = [f"done-{i}" for i in range(n_done)]
        new_tags = [f"new-{i}" for i in range(n_new)]
        load.dispatch_many(done_tags, own_ids=True)
        wait_final(load.accepted(), h.settle)

        cluster.redis.sigkill()
        outage_began = time.monotonic()
        load.dispatch_many(done_tags, own_ids=True)
        during = load.dispatch_many(new_tags, own_ids=True)
        first_start = _first_starts(ledger, {a.tag: a.at for a in during if a.handle}, timeout=down)
        time.sleep(max(0.0, down - (time.monotonic() - outage_began)))
        cluster.redis.start()
        wait_for(lambda: not get_dispatcher().breaker.is_open, timeout=30)
        wait_for(lambda: cluster.live_workers() > 0, timeout=30)
        load.dispatch_many(new_tags + done_tags, own_ids=True)
        final = wait_final(load.accepted(), h.settle)
        row = finish("same job_id re-dispatched in outage", load, final)
        waits = list(first_start.values())
        row.extra["outage_start_s_max"] = round(max(waits), 2) if waits else None
        row.extra["outage_not_started_in_2s"] = n_new - sum(1 for w in waits if w <= 2.0)
        row.require(
            row.extra["outage_not_started_in_2s"] == 0,
            "rule 2: an own-id job dispatched during an outage starts on Temporal within 2 s",
        )
        return row
    finally:
        cluster.close()


def _first_starts(
    ledger: Ledger, dispatched_at: dict[str, float], timeout: float
) -> dict[str, float]:
    """tag -> seconds from dispatch to the job's first step START, for those that started."""
    ledger_wait(ledger, lambda lg: dispatched_at.keys() <= lg.started_tags(), timeout)
    out = {}
    for tag, steps in ledger.histories().items():
        if tag in dispatched_at and "s0" in steps:
            out[tag] = steps["s0"].executions[0].started - dispatched_at[tag]
    return out


@_timed
def temporal_down_redis_paused(
    h: Harness, n_before: int = 100, n_during: int = 200, threads: int = 8, pause: float = 6.0
) -> Row:
    """Temporal unreachable from the dispatching process while Redis is paused: callers told
    "not started" must not see their job run."""
    ledger = h.ledger("both-down")
    cluster = h.cluster(aof=True)
    try:
        cluster.start_both()
        say("workers up")
        load = Load(ledger, **WORKLOAD)
        # Concurrent callers, so the pool holds warm connections as a busy web process's does.
        load.dispatch_many([f"before-{i}" for i in range(n_before)], threads=threads)
        # The dispatcher of this process sees Temporal down (a port nobody listens on); the
        # workers keep the real one, so a job that did reach Redis can run.
        cluster.apply({"TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
                       "TEMPORAL_START_TIMEOUT": "0.5"}, keep_connections=True)  # fmt: skip
        get_dispatcher()  # built while Redis answers, as a running web process's is
        cluster.redis.pause()
        paused_at = time.monotonic()
        say("redis SIGSTOPped, temporal unreachable from the dispatcher")
        load.dispatch_many([f"during-{i}" for i in range(n_during)], threads=threads)
        time.sleep(max(0.0, pause - (time.monotonic() - paused_at)))
        cluster.redis.resume()
        cluster.apply({}, keep_connections=True)
        errors = load.refused()
        # Only DispatchUnavailableError says "not started"; DispatchOutcomeUnknownError says the
        # job may run, so its job running is no lie: the caller retries with the error's job_id,
        # which must start the job if nothing did and be a duplicate otherwise (the ledger would
        # show a second run as a re-run of a returned step).
        refused = {t for t, e in errors.items() if e == "DispatchUnavailableError"}
        unknown = {t for t, e in errors.items() if e == "DispatchOutcomeUnknownError"}
        unknown_ids = {a.tag: a.job_id for a in load.attempts if a.tag in unknown}
        wait_for(lambda: not get_dispatcher().breaker.is_open, timeout=30)
        retries = [load.dispatch(t, job_id=j) for t, j in unknown_ids.items() if j]
        final = wait_final(load.accepted(), h.settle)
        # Give jobs that did land in Redis time to run before counting them.
        time.sleep(min(h.settle, 10))
        started = ledger.started_tags()
        ran_anyway = sorted(t for t in refused if t in started)
        ids = {a.tag: a.job_id for a in load.attempts if a.tag in refused and a.job_id}
        exists = sorted(t for t, j in ids.items() if status_of(j) is not None)
        row = finish("temporal down + redis paused", load, final)
        row.extra["not_started_errors"] = len(refused)
        row.extra["not_started_but_ran"] = len(ran_anyway)
        row.extra["not_started_but_queued"] = len(set(exists) - set(ran_anyway))
        row.extra["outcome_unknown_errors"] = len(unknown)
        row.extra["outcome_unknown_ran"] = sum(1 for t in unknown if t in started)
        row.extra["unknown_retried_duplicate"] = sum(
            1 for a in retries if a.handle is not None and a.handle.duplicate
        )
        row.require(
            len(unknown_ids) == len(unknown) and all(a.handle is not None for a in retries),
            "rule 4: an unknown outcome names the job id, and a retry with it is accepted",
        )
        other = sorted({e for t, e in errors.items() if t not in refused | unknown})
        if other:
            row.extra["other_errors"] = ",".join(other)
        row.require(
            not ran_anyway and not exists,
            'rule 4: a job whose caller was told "not started" never runs nor waits on a queue',
        )
        return row
    finally:
        cluster.close()


@_timed
def big_payload(h: Harness, n_big: int = 3, megabytes: int = 20, n_small: int = 200) -> Row:
    """A payload too big for one engine, then ordinary jobs from the same process."""
    ledger = h.ledger("big")
    cluster = h.cluster(aof=True)
    try:
        cluster.start_both()
        say("workers up")
        load = Load(ledger, steps=1, work=0.01)
        blob = "x" * (megabytes * 1024 * 1024)
        big = [load.dispatch(f"big-{i}", blob=blob) for i in range(n_big)]
        small = load.dispatch_many([f"small-{i}" for i in range(n_small)])
        final = wait_final(load.accepted(), h.settle)
        time.sleep(min(h.settle, 5))
        started = ledger.started_tags()
        row = finish(f"{megabytes} MB payload", load, final)
        row.extra["big_dispatch_s_max"] = round(max(a.seconds for a in big), 2)
        row.extra["big_outcomes"] = ",".join(
            sorted({a.error or f"{a.handle.engine}" for a in big})  # type: ignore[union-attr]
        )
        refused_ran = [a.tag for a in big if a.error and a.tag in started]
        row.extra["big_refused_but_ran"] = len(refused_ran)
        collateral = sum(1 for a in small if a.handle is None or a.handle.engine != "dramatiq")
        row.extra["small_off_dramatiq"] = collateral
        row.require(not refused_ran, "rule 4: a refused payload never runs")
        row.require(
            all(a.error in (None, "InvalidPayloadError", "PayloadTooLargeError") for a in big),
            "rule 4: a payload one engine cannot carry is refused before any engine is touched",
        )
        row.require(collateral == 0, "one big payload sends no other job off Dramatiq")
        return row
    finally:
        cluster.close()


# --- worker faults -----------------------------------------------------------------------------


@_timed
def dramatiq_workers_killed(
    h: Harness,
    n_delayed: int = 200,
    n_running: int = 20,
    n_queued: int = 80,
    delay: float = 3.0,
    long_work: float = 300.0,
) -> Row:
    """Every Dramatiq worker SIGKILLed: delayed jobs, jobs killed mid-step, jobs still queued."""
    ledger = h.ledger("workers-killed")
    cluster = h.cluster(aof=True)
    try:
        worker, _ = cluster.start_both()
        say("workers up")
        load = Load(ledger, steps=3, work=0.05)
        # Long on Dramatiq only: they must still be mid-step when the workers die however slow
        # the dispatches after them are, and quick wherever they resume.
        long = {"long_step": 1, "long_work": long_work, "long_only_on": "dramatiq"}
        load.dispatch_many([f"running-{i}" for i in range(n_running)], **long)
        # Every worker thread busy with one, so that the queued jobs after them wait on the
        # queue and the kill finds no short step half-recorded (a kill in the milliseconds
        # between a step's return and its record reruns it: the at-least-once window that
        # ctx.step_key covers, not what this row measures). One worker process may have
        # prefetched them all while the other idles: more, until every thread has one.
        threads = h.processes * 10
        ledger_wait(ledger, lambda lg: starts(lg, "s1") >= min(n_running, threads), 10)
        extra = n_running
        while starts(ledger, "s1") < threads and extra < 4 * threads:
            load.dispatch(f"running-{extra}", **long)
            extra += 1
            ledger_wait(ledger, lambda lg: starts(lg, "s1") >= threads, 0.3)
        ledger_wait(ledger, lambda lg: starts(lg, "s1") >= threads, 5)
        load.dispatch_many([f"queued-{i}" for i in range(n_queued)])
        load.dispatch_many([f"delayed-{i}" for i in range(n_delayed)], delay=delay)
        Cluster.sigkill(worker)
        killed_at = time.time()
        say("dramatiq workers SIGKILLed")
        final = wait_final(load.accepted(), h.settle + delay)
        row = finish("all dramatiq workers killed", load, final)
        # Moved = the job's Temporal workflow started (the rescue's handoff); started = its first
        # step began there (after its delay, and behind every other moved job on one worker).
        moved_at = _workflow_starts(load.accepted())
        # Jobs that finished on Dramatiq before the kill have nothing to move.
        to_move = [t for t in load.accepted() if t not in final or final[t].engine != "dramatiq"]
        moved = [at - killed_at for at in moved_at.values()]
        first_step = {
            t: min(
                e.started for s in steps.values() for e in s.executions if e.engine == "temporal"
            )
            for t, steps in ledger.histories().items()
            if t in moved_at
            and any(e.engine == "temporal" for s in steps.values() for e in s.executions)
        }
        started = [
            at - killed_at - (delay if t.startswith("delayed") else 0)
            for t, at in first_step.items()
        ]
        row.extra["moved_to_temporal"] = f"{len(moved)}/{len(to_move)}"
        row.extra["last_move_s"] = round(max(moved), 1) if moved else None
        row.extra["last_start_s"] = round(max(started), 1) if started else None
        for group in ("running", "queued", "delayed"):
            tags = [t for t in load.accepted() if t.startswith(group)]
            row.extra[f"{group}_final"] = f"{sum(1 for t in tags if t in final)}/{len(tags)}"
        bound = float(cluster.env["WORKER_HEARTBEAT_TIMEOUT"]) + float(
            cluster.env["JOBYARD_RESCUE_INTERVAL"]
        )
        row.require(
            set(to_move) <= set(moved_at) and max(moved, default=0) <= bound,
            f"rule 5: every job moves to Temporal within {bound:g} s",
        )
        return row
    finally:
        cluster.close()


@_timed
def sigterm_grace(h: Harness, n: int = 200, grace: float = 3.0, work: float = 2.5) -> Row:
    """SIGTERM with a `grace` s grace period just after every thread started a job of 0.5 s to
    `work` s (staggered, as in-flight jobs are): each can finish inside the grace, so none may be
    cut off."""
    ledger = h.ledger("sigterm")
    cluster = h.cluster(aof=True, env={"WORKER_SHUTDOWN_GRACE": f"{grace:g}"})
    try:
        worker, _ = cluster.start_both()
        say("workers up")
        threads = h.processes * 10  # processes of WORKER_CONCURRENCY_DEFAULT threads
        load = Load(ledger, steps=1)
        for i in range(n):
            load.dispatch(f"j{i}", work=0.5 + (work - 0.5) * (i % 10) / 9)
        ledger_wait(ledger, lambda lg: len(lg.started_tags()) >= min(n, threads), 60)
        termed_at = time.time()
        exit_s = Cluster.sigterm(worker, timeout=grace + 30)
        say(f"worker exited {exit_s:.1f}s after SIGTERM")
        in_flight = _open_executions(ledger, before=termed_at)
        cluster.start_worker()
        final = wait_final(load.accepted(), h.settle)
        row = finish(f"SIGTERM, {grace:g} s grace", load, final)
        row.extra["exit_s"] = round(exit_s, 2)
        row.extra["in_flight_at_sigterm"] = in_flight["total"]
        row.extra["cut_off_in_grace"] = in_flight["open"]
        row.extra["needed_s_max"] = round(in_flight["needed"], 2)
        row.require(
            in_flight["open"] == 0,
            "rule 7: in-flight jobs get the whole grace period (none that could finish is cut off)",
        )
        return row
    finally:
        cluster.close()


def _workflow_starts(ids: dict[str, str]) -> dict[str, float]:
    """tag -> unix seconds the job's Temporal workflow started, for jobs that have one."""
    temporal = get_dispatcher().temporal

    async def start_times() -> dict[str, float]:
        client = await temporal.client()
        out = {}
        for tag, job_id in ids.items():
            with contextlib.suppress(Exception):  # not on Temporal
                described = await client.get_workflow_handle(job_id).describe()
                out[tag] = described.start_time.timestamp()
        return out

    return temporal.run(start_times(), timeout=120)


def _open_executions(ledger: Ledger, before: float) -> dict[str, int]:
    """Executions started before `before`, how many never ended, and the longest time one of
    them still needed after `before` (to end, or until now if it never did)."""
    total = open_ = 0
    needed = 0.0
    for steps in ledger.histories().values():
        for history in steps.values():
            for e in history.executions:
                if e.started < before and e.engine == "dramatiq":
                    total += 1
                    open_ += e.ended is None
                    if e.ended is not None:
                        needed = max(needed, e.ended - before)
    return {"total": total, "open": open_, "needed": needed}


@_timed
def dramatiq_time_limit(h: Harness, n: int = 40, work: float = 10.0, timeout: float = 2.0) -> Row:
    """Steps that block (time.sleep in C, which an exception raised in the thread cannot stop)
    past the job's timeout on Dramatiq, then a canary behind them.

    A step past the limit is abandoned: the worker thread is freed at the limit and the run
    fails (retried, then dead per the job's policy), while the stuck call finishes on its own in
    the thread it was left in, its result discarded (its late END line is no return: the job had
    given up on it). So the row measures, for every execution, how long the job stayed with it:
    from its START to the worker's log line that gave it up (retried or dead)."""
    ledger = h.ledger("time-limit")
    cluster = h.cluster(aof=True, env={"JOBYARD_JOB_FAULTS_OVERRUN_TIMEOUT": f"{timeout:g}"})
    try:
        worker = cluster.start_worker()
        load = Load(ledger, job="faults.overrun", work=work, blocking=True)
        load.dispatch_many([f"over-{i}" for i in range(n)])
        ledger_wait(ledger, lambda lg: starts(lg) >= min(n, h.processes * 10), 60)
        canary = Load(ledger, job="faults.canary")
        began = time.monotonic()
        c = canary.dispatch("canary")
        wait_final({"canary": c.job_id}, h.settle) if c.job_id else None
        canary_s = time.monotonic() - began
        final = wait_final(load.accepted(), h.settle + 2 * work)
        row = finish(f"step past {timeout:g} s timeout (dramatiq)", load, final)
        gave_up = _gave_up(worker.output())
        held, unmatched = [], 0
        for tag, steps in ledger.histories().items():
            job_id = load.accepted().get(tag)
            if job_id is None or "s0" not in steps:
                continue
            begun = [e.started for e in steps["s0"].executions]
            ends = gave_up.get(job_id, [])
            unmatched += abs(len(begun) - len(ends))
            held += [end - start for start, end in zip(begun, ends, strict=False)]
        over = sum(1 for s in held if s > timeout + 1.0)
        row.extra["held_s_max"] = round(max(held), 1) if held else None
        row.extra["held_past_limit"] = over
        row.extra["unmatched"] = unmatched
        attempts = sorted({s.attempts for s in final.values()})
        states = sorted({s.state for s in final.values()})
        row.extra["final"] = ",".join(states) + " after " + ",".join(map(str, attempts))
        row.extra["canary_wait_s"] = round(canary_s, 1)
        row.require(
            over == 0 and unmatched == 0,
            "rule 6: a step past the job's timeout is interrupted (its run ends at the limit)",
        )
        row.require(canary_s <= timeout + 3, "rule 6: the worker thread is freed (canary waits)")
        row.require(
            states == ["dead"] and attempts == [2],
            "rule 6: an interrupted job retries, then fails, per its policy (2 attempts)",
        )
        return row
    finally:
        cluster.close()


_GAVE_UP = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ jobyard\.worker\[\d+\] "
    r"job (\S+) (?:attempt \d+: TimeLimitExceeded|dead after)",
    re.MULTILINE,
)


def _gave_up(log: str) -> dict[str, list[float]]:
    """job id -> unix seconds of each run the worker ended (retried or dead), from its log."""
    out: dict[str, list[float]] = {}
    for stamp, job_id in _GAVE_UP.findall(log):
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time
        out.setdefault(job_id, []).append(at)
    return out


@_timed
def temporal_worker_killed(
    h: Harness, n: int = 100, work: float = 5.0, job_timeout: float | None = None
) -> Row:
    """One of two Temporal workers SIGKILLed while it runs steps; the other one must retry
    them promptly."""
    ledger = h.ledger("temporal-killed")
    extra_env = {"JOBYARD_JOB_FAULTS_CHAIN_TIMEOUT": f"{job_timeout:g}"} if job_timeout else {}
    cluster = h.cluster(aof=True, env=extra_env)
    try:
        victim = cluster.start_temporal_worker(wait=False)
        survivor = cluster.start_temporal_worker(wait=False)
        cluster.wait_ready(victim)
        cluster.wait_ready(survivor)
        # `jobyard temporal-worker` runs its worker in a child process: the steps' pids.
        victim_pids = {victim.pid, *descendant_pids(victim.pid)}
        cluster.apply({"USE_DRAMATIQ": "false"})
        load = Load(ledger, steps=2, work=0.05, long_step=0, long_work=work)
        # In the background: dispatching takes seconds on a loaded machine, and the kill must
        # land while the first steps are still young (see mid_step).
        feeder = load.in_background([f"j{i}" for i in range(n)])

        def victim_busy(lg: Ledger) -> bool:
            return any(
                e.pid in victim_pids and e.ended is None
                for st in lg.histories().values()
                for e in st["s0"].executions
            )

        def mid_step(lg: Ledger) -> bool:
            """The victim runs long steps that have a while to go, and returned none in the last
            second: a kill then interrupts steps. (A kill in the milliseconds after a step's
            function returned, before Temporal heard of it, reruns a returned step: that window
            is what ctx.step_key is for, and not what this row measures.)"""
            now = time.time()
            victims = [
                (name, e)
                for st in lg.histories().values()
                for name, h in st.items()
                for e in h.executions
                if e.pid in victim_pids
            ]
            running = [(name, e) for name, e in victims if e.ended is None]
            return bool(running) and all(
                now - e.ended > 1.0
                if e.ended is not None
                else name == "s0" and now - e.started < work - 1.5
                for name, e in victims
            )

        ledger_wait(ledger, victim_busy, 60)
        time.sleep(min(1.0, work / 4))
        ledger_wait(ledger, mid_step, 30)
        Cluster.sigkill(victim)
        killed_at = time.time()
        say("temporal worker SIGKILLed")
        feeder.join()
        cut = {
            t
            for t, st in ledger.histories().items()
            if any(e.pid in victim_pids and e.ended is None for e in st["s0"].executions)
        }
        bound = (job_timeout or 60) + 30
        ledger_wait(
            ledger,
            lambda lg: all(len(lg.histories()[t]["s0"].executions) > 1 for t in cut),
            bound,
        )
        final = wait_final(load.accepted(), h.settle)
        row = finish("temporal worker SIGKILLed mid-step", load, final)
        histories = ledger.histories()
        retried = [
            histories[t]["s0"].executions[1].started - killed_at
            for t in cut
            if len(histories[t]["s0"].executions) > 1
        ]
        row.extra["cut_steps"] = len(cut)
        row.extra["retried"] = len(retried)
        row.extra["retry_s_median"] = round(statistics.median(retried), 1) if retried else None
        row.extra["retry_s_max"] = round(max(retried), 1) if retried else None
        row.require(
            bool(cut) and len(retried) == len(cut) and max(retried, default=0) <= 15,
            "rule 8: a killed Temporal worker's step is retried within 15 s",
        )
        return row
    finally:
        cluster.close()


@_timed
def cancel_then_retry(h: Harness, n: int = 100, work: float = 1.0) -> Row:
    """Jobs cancelled while a step runs; the step then fails, so the cancel lands on the retry.
    Every job's Redis record must expire."""
    ledger = h.ledger("cancel")
    cluster = h.cluster(aof=True)
    try:
        cluster.start_both()
        say("workers up")
        load = Load(ledger, steps=2, work=0.05, long_step=0, long_work=work, fail_once=0)
        load.dispatch_many([f"j{i}" for i in range(n)])
        ids = load.accepted()
        pending = dict(ids)
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            started = ledger.started_tags()
            for tag in [t for t in pending if t in started]:
                cancel_job(pending.pop(tag))
            time.sleep(0.05)
        say("cancel requested for every job")
        final = wait_final(ids, h.settle)
        row = finish("cancelled while running, retried", load, final)
        client = cluster.redis.client()
        try:
            ttls = [client.ttl(keys.job(job_id)) for job_id in ids.values()]
        finally:
            client.close()
        row.extra["cancelled"] = sum(1 for s in final.values() if s.state == "cancelled")
        row.extra["records_without_ttl"] = sum(1 for t in ttls if t == -1)
        row.extra["ttl_s_min"] = min((t for t in ttls if t >= 0), default=None)
        row.require(
            row.extra["records_without_ttl"] == 0,
            "rule 9: every Redis record of a finished job expires",
        )
        return row
    finally:
        cluster.close()


# --- the suites --------------------------------------------------------------------------------

#: (scenario, its parameters) for `make chaos`: hundreds of jobs per fault.
FULL: list[tuple[Callable[..., Row], dict[str, Any]]] = [
    (redis_sigkill_aof, {"n": 500}),
    (redis_restart_empty, {"n": 300}),
    (redis_sigstop, {"n": 500}),
    (redispatch_during_outage, {"n_done": 150, "n_new": 100}),
    (temporal_down_redis_paused, {"n_before": 100, "n_during": 200}),
    (big_payload, {"n_big": 3, "n_small": 200}),
    (dramatiq_workers_killed, {"n_delayed": 200, "n_running": 20, "n_queued": 80}),
    (sigterm_grace, {"n": 200}),
    (dramatiq_time_limit, {"n": 40}),
    (temporal_worker_killed, {"n": 100}),
    (cancel_then_retry, {"n": 100}),
]

COLUMNS = ("dispatched", "accepted", "completed", "lost", "both_engines",
           "rerun_returned", "rerun_interrupted")  # fmt: skip


def table(rows: list[Row]) -> str:
    head = ["fault", "disp", "acc", "done", "lost", "both", "rerun-ret", "rerun-int", "s",
            "row-specific"]  # fmt: skip
    lines = [head]
    for r in rows:
        extra = " ".join(f"{k}={v}" for k, v in r.extra.items())
        lines.append([r.fault, *(str(getattr(r, c)) for c in COLUMNS), str(r.seconds), extra])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    out = []
    for line in lines:
        cells = [
            line[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(line[1:-1], widths[1:], strict=True)),
        ]
        out.append("  ".join([*cells, line[-1]]))
    return "\n".join(out)

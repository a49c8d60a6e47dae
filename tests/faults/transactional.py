"""The `make chaos` rows of issue 32: jobs dispatched in the web process's own transactions
(`dispatch_job(..., connection=)`) and sent by the relays of `jobyard worker` and `jobyard
temporal-worker`, while the web process is SIGKILLed right after its last commit and the
Dramatiq worker's supervisor (its relay with it) is SIGKILLed mid-run; then, on SQLite, Redis is
down for `down` seconds as transactions keep committing (the relays then send to Temporal), and
on PostgreSQL the database itself goes away for `blink` seconds while the relays run (every
connection cut, new ones refused: a restart, on the row's own database only, never the shared
server). Every committed job runs once, no rolled-back one ever runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

from jobyard.dispatcher import JobHandle
from jobyard.job_engine.db import get_engine
from tests.faults.procs import Cluster, database_away
from tests.faults.scenarios import Attempt, Harness, Load, Row, _timed, finish, say, wait_final
from tests.faults.txn_web import tag
from tests.support import ROOT, migrated_pg_database

#: What a row does to its cluster once the relay was killed, for `span` x 0.7 seconds or so.
Faults = Callable[[Cluster, float], None]


@_timed
def transactional_dispatch(h: Harness, n: int = 2000, rate: float = 40, down: float = 30.0) -> Row:
    """Web process SIGKILLed after its last commit, a relay SIGKILLed mid-run, Redis down."""

    def redis_down(cluster: Cluster, span: float) -> None:
        time.sleep(span * 0.1)
        cluster.redis.sigkill()
        say("redis SIGKILLed")
        time.sleep(down)
        cluster.redis.start()
        say("redis back")

    fault = f"txn dispatch: web+relay SIGKILL, redis down {down:.0f}s"
    # What committed during the outage went to Temporal, whose dev server takes a while to run
    # that many on this machine (measured: about 10 jobs/s while the rest runs).
    return _row(h, fault, n, rate, redis_down, {}, wait=down + 0.1 * n)


@_timed
def transactional_dispatch_pg(
    h: Harness, n: int = 2000, rate: float = 40, blink: float = 10.0
) -> Row:
    """The same on PostgreSQL, whose database goes away while the relays run."""
    fault = f"txn dispatch on PostgreSQL: web+relay SIGKILL, database gone {blink:.0f}s"
    with migrated_pg_database("jobyard_chaos_txn") as url:
        name = url.rpartition("/")[2]

        def database_gone(cluster: Cluster, span: float) -> None:
            time.sleep(span * 0.1)
            cut = database_away(name, blink)
            say(f"database refused connections {blink:.0f} s ({cut} connections cut)")

        return _row(h, fault, n, rate, database_gone, {"DATABASE_URL": url}, wait=blink + 60)


def _row(
    h: Harness, fault: str, n: int, rate: float, faults: Faults, env: dict[str, str], wait: float
) -> Row:
    ledger = h.ledger("transactional")
    cluster = h.cluster(aof=True, env=env)
    prefix = f"t{uuid.uuid4().hex[:6]}"
    worker = None
    try:
        worker, _ = cluster.start_both()
        say("workers up")
        web = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.txn_web", str(ledger.path), prefix, str(n),
             str(rate)], cwd=ROOT, env=dict(os.environ),
        )  # fmt: skip
        span = n / rate
        time.sleep(span * 0.2)
        # The supervisor alone, with its relay thread, mid-batch or between batches: its
        # worker processes run on (a kill of those would be a rerun window of its own, which
        # the other rows measure).
        worker.proc.kill()
        worker.proc.wait()
        say("worker supervisor (and its relay) SIGKILLed")
        cluster.start_worker(wait=False)
        faults(cluster, span)
        web.wait(timeout=span * 3 + 120)
        say(f"web process ended: {web.returncode}")
        committed = {tag(prefix, i) for i in range(n) if i % 5 != 4}
        rolled_back = {tag(prefix, i) for i in range(n) if i % 5 == 4}
        load = Load(ledger)
        load.attempts = [
            Attempt(t, t, 0.0, 0.0, handle=JobHandle(t, "outbox")) for t in sorted(committed)
        ]
        final = wait_final({t: t for t in committed}, h.settle + wait)
        row = finish(fault, load, final)
        ran_rolled_back = len(ledger.started_tags() & rolled_back)
        runs = [len(steps["s0"].executions) for t, steps in ledger.histories().items()
                if t in committed and "s0" in steps]  # fmt: skip
        row.extra.update(
            web_killed=web.returncode == -signal.SIGKILL,
            rolled_back=len(rolled_back),
            rolled_back_ran=ran_rolled_back,
            first_step_twice=sum(1 for count in runs if count > 1),
            outbox_left=_outbox_left(),
        )
        row.require(web.returncode == -signal.SIGKILL, "the web process died by SIGKILL")
        row.require(ran_rolled_back == 0, "a rolled-back transaction's job never runs")
        row.require(row.extra["outbox_left"] == 0, "every committed outbox row was sent")
        return row
    finally:
        if worker is not None:  # its worker processes, which outlived their supervisor
            worker.signal_group(signal.SIGKILL)
        cluster.close()


def _outbox_left() -> int:
    with get_engine().connect() as connection:
        return int(connection.exec_driver_sql("SELECT count(*) FROM dispatch_outbox").scalar() or 0)


ROWS = [(transactional_dispatch, {"n": 2000}), (transactional_dispatch_pg, {"n": 2000})]

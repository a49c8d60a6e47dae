"""The `make chaos` row of issue 32: jobs dispatched in the web process's own transactions
(`dispatch_job(..., connection=)`) and sent by the relays of `jobyard worker` and `jobyard
temporal-worker`, while the web process is SIGKILLed right after its last commit, the Dramatiq
worker's supervisor (its relay with it) is SIGKILLed mid-run, and Redis is down for `down`
seconds as transactions keep committing (the relays then send to Temporal). Every committed job
runs once, no rolled-back one ever runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

from jobyard.dispatcher import JobHandle
from jobyard.job_engine.db import get_engine
from tests.faults.scenarios import Attempt, Harness, Load, Row, _timed, finish, say, wait_final
from tests.faults.txn_web import tag
from tests.support import ROOT


@_timed
def transactional_dispatch(h: Harness, n: int = 2000, rate: float = 40, down: float = 30.0) -> Row:
    """Web process SIGKILLed after its last commit, a relay SIGKILLed mid-run, Redis down."""
    fault = f"txn dispatch: web+relay SIGKILL, redis down {down:.0f}s"
    ledger = h.ledger("transactional")
    cluster = h.cluster(aof=True)
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
        time.sleep(span * 0.1)
        cluster.redis.sigkill()
        say("redis SIGKILLed")
        time.sleep(down)
        cluster.redis.start()
        say("redis back")
        web.wait(timeout=span * 3 + 120)
        say(f"web process ended: {web.returncode}")
        committed = {tag(prefix, i) for i in range(n) if i % 5 != 4}
        rolled_back = {tag(prefix, i) for i in range(n) if i % 5 == 4}
        load = Load(ledger)
        load.attempts = [
            Attempt(t, t, 0.0, 0.0, handle=JobHandle(t, "outbox")) for t in sorted(committed)
        ]
        # What committed during the outage went to Temporal, whose dev server takes a while
        # to run that many on this machine (measured: about 10 jobs/s while the rest runs).
        final = wait_final({t: t for t in committed}, h.settle + down + 0.1 * n)
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


ROWS = [(transactional_dispatch, {"n": 2000})]

"""The fault row of issue 33's key rotation under load: jobs delayed (dispatched with a delay) or
parked in `ctx.sleep`, sealed with key k1; the workers restarted one set after the other with
"k2,k1" (the new key first); `jobyard keys rotate` run as its own process while the jobs wait;
then k1 removed from every process (the workers restarted again with "k2" alone, the harness's
reads too) while most of the jobs still wait. A tenth of each kind waits 3 s only, so jobs that
ended under k1 alone are in Redis and the job log too; three tenths come due all along the row,
during the restarts and the rotation too; the rest wait 240 to 270 s.

Targets: nothing lost; every job succeeds; each step of each job executes exactly once (the
ledger); none fails for a key (no MissingEncryptionKeyError or DecryptionError in the workers'
output or the job log); every job's result, payload and steps read back through get_job,
get_job_record and get_job_steps with k2 alone; and nothing in Redis or the job log is still
sealed with k1.

    python -m tests.faults.run -k key_rotation                # this row alone, 2,000 jobs
    python -m tests.faults.run -k key_rotation --scale 0.1    # 200
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select

from jobyard.dispatcher import get_job
from jobyard.dispatcher.lifecycle import get_job_record, get_job_steps
from jobyard.job_engine import crypto, env
from jobyard.job_engine.db import get_engine
from jobyard.job_engine.db.models import JobLog
from jobyard.job_engine.db.rotation import ROTATED
from jobyard.queue.rotation import RedisRotation
from tests.faults.ledger import Ledger
from tests.faults.procs import Cluster
from tests.faults.scenarios import TERMINAL, Harness, Load, Row, _timed, finish, say, status_of
from tests.faults.scenarios import wait_final as wait_final_states
from tests.support import ROOT, Proc, wait_for

STEPS = ("s0", "s1")  # each job: s0, then (parked jobs) a ctx.sleep, then s1
EARLY_WAIT = 3.0  # what the tenth of the jobs that end under k1 alone wait
#: The words a failure for a key shows (crypto.MissingEncryptionKeyError, DecryptionError).
KEY_FAILURES = ("MissingEncryptionKeyError", "DecryptionError")
ROTATE_RUNS = 3  # `jobyard keys rotate` again while it reports values still on k1
ROTATE_ARGS: list[str] = []  # (a mutation check sets ["--no-redis"])


def _keys_everywhere(cluster: Cluster, setting: str) -> None:
    """This process (dispatch, get_job) reads with `setting` from now on."""
    cluster.env[env.ENCRYPTION_KEYS] = setting
    os.environ[env.ENCRYPTION_KEYS] = setting
    crypto.reset()


def _rolling_restart(cluster: Cluster, old: Proc, setting: str) -> Proc:
    """A new set of workers reading `setting`, beating beside the old set, then the old set
    SIGTERMed (a rolling deploy: the queue always has live workers, so nothing is rescued)."""
    before = cluster.live_workers()
    new = cluster.start_worker(extra={env.ENCRYPTION_KEYS: setting}, wait=False)
    wait_for(lambda: cluster.live_workers() >= 2 * before, timeout=180, interval=0.2)
    cluster.sigterm(old, timeout=60)
    say(f"workers restarted with keys {_ids(setting)}")
    return new


def _ids(setting: str) -> str:
    return ",".join(item.partition(":")[0] for item in setting.split(","))


def _rotate(cluster: Cluster) -> tuple[int, dict[str, Any]]:
    """`jobyard keys rotate` as its own process: (its exit status, its last line)."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobyard.cli", "keys", "rotate", *ROTATE_ARGS],
        env=dict(os.environ) | cluster.env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    for line in lines:
        if '"redis_pass"' in line or '"waiting_for' in line:
            say(f"rotate: {line}")
    if proc.returncode not in (0, 3) or not lines:
        raise AssertionError(f"jobyard keys rotate exited {proc.returncode}:\n{proc.stderr}")
    say(f"rotate exited {proc.returncode}: {lines[-1]}")
    return proc.returncode, json.loads(lines[-1])


def _not_exactly_once(ledger: Ledger, tags: dict[str, str]) -> int:
    """Jobs one of whose steps did not execute exactly once, to its end."""
    histories = ledger.histories()
    bad = 0
    for tag in tags:
        steps = histories.get(tag, {})
        once = all(
            len(steps[name].executions) == 1
            and steps[name].executions[0].ended is not None
            and not steps[name].executions[0].failed
            for name in STEPS
            if name in steps
        )
        bad += not (once and set(steps) == set(STEPS))
    return bad


def _failed_for_a_key(cluster: Cluster) -> int:
    """Mentions of a key failure in the workers' output, and job log rows failed with one."""
    mentions = sum(p.output().count(word) for p in cluster.procs for word in KEY_FAILURES)
    with get_engine(cluster.env["DATABASE_URL"]).connect() as connection:
        rows = connection.execute(
            select(JobLog.job_id).where(JobLog.error_class.in_(KEY_FAILURES))
        ).all()
    return mentions + len(rows)


def _unreadable(ids: dict[str, str]) -> int:
    """Jobs whose result, payload or steps do not read back with the ring as it is now."""
    bad = 0
    for tag, job_id in ids.items():
        try:
            status = get_job(job_id)
            record = get_job_record(job_id)
            steps = get_job_steps(job_id)
            ok = (
                status.result == len(STEPS)
                and record is not None
                and record.payload.get("tag") == tag
                and all(
                    isinstance(steps.get(name), dict) and "pid" in steps[name] for name in STEPS
                )
            )
        except Exception as exc:  # a missing key, or anything else: not readable
            say(f"  unreadable {tag} {job_id}: {type(exc).__name__}: {exc}")
            ok = False
        else:
            if not ok and bad < 5:
                seen = (status.state, status.result, record and record.payload, sorted(steps))
                say(f"  unreadable {tag} {job_id}: read {seen}")
        bad += not ok
    return bad


def _on_key_in_log(database_url: str, key_id: str) -> int:
    """Values of the job log's sealed columns (every table `jobyard keys rotate` rewrites)
    still sealed with `key_id`."""
    found = 0
    with get_engine(database_url).connect() as connection:
        for table, columns in ROTATED.items():
            for row in connection.execute(select(*(table.c[name] for name in columns))):
                found += sum(key_id in crypto.key_ids_within(str(v)) for v in row if v)
    return found


@_timed
def key_rotation_under_load(
    h: Harness, n_delayed: int = 1000, n_parked: int = 1000, hold: float = 240.0
) -> Row:
    """`n_delayed` jobs dispatched with a delay and `n_parked` parked in ctx.sleep, most for
    `hold` to `hold` + 30 s; k2 added, `jobyard keys rotate`, k1 removed while they wait."""
    fault = "key rotation under load"
    k1, k2 = f"k1:{crypto.new_key()}", f"k2:{crypto.new_key()}"
    ledger = h.ledger(fault)
    cluster = h.cluster(aof=True, env={env.ENCRYPTION_KEYS: k1})
    try:
        _keys_everywhere(cluster, k1)
        workers = cluster.start_worker()
        say("workers up with key k1")
        load = Load(ledger, steps=len(STEPS), work=0.0)
        draw = random.Random(33)

        def wait_of(i: int, n: int) -> float:
            # A tenth end under k1 alone; three tenths come due all along the row (while the
            # workers restart, while the rotation runs and moves the very messages it
            # rewrites); the rest wait past `hold`, which outlasts the restarts and the
            # rotation even on a crowded machine, so they are still waiting when k1 goes.
            if i < max(1, n // 10):
                return EARLY_WAIT
            return draw.uniform(10, hold) if i < max(1, 4 * n // 10) else hold + draw.uniform(0, 30)

        plan = [(f"d{i}", {"delay": wait_of(i, n_delayed)}) for i in range(n_delayed)]
        plan += [(f"p{i}", {"sleep": wait_of(i, n_parked)}) for i in range(n_parked)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda item: load.dispatch(item[0], **item[1]), plan))
        ids = load.accepted()
        say(f"{len(ids)} of {len(plan)} dispatched with k1")

        parked = {tag for tag in ids if tag.startswith("p")}
        wait_for(
            lambda: all("s0" in ledger.histories().get(tag, {}) for tag in parked),
            timeout=hold, interval=1.0,
        )  # fmt: skip
        say("every parked job ran s0 and sleeps")
        early = {t: ids[t] for t, w in plan if t in ids and EARLY_WAIT in w.values()}
        wait_final_states(early, 120)  # ended under k1 alone: their records and rows hold it

        _keys_everywhere(cluster, f"{k2},{k1}")
        workers = _rolling_restart(cluster, workers, f"{k2},{k1}")
        began = time.monotonic()
        runs, code, report = 0, 3, {}
        while code == 3 and runs < ROTATE_RUNS:
            code, report = _rotate(cluster)
            runs += 1
        rotate_s = time.monotonic() - began

        waiting = sum(
            1
            for job_id in ids.values()
            if (status := status_of(job_id)) is None or status.state not in TERMINAL
        )
        _keys_everywhere(cluster, k2)
        workers = _rolling_restart(cluster, workers, k2)
        say(f"k1 removed everywhere; {waiting} jobs were still waiting")

        final = wait_final_states(ids, hold + 30 + h.settle)
        row = finish(fault, load, final)
        rotated = report.get("rotated", {})
        left = report.get("left_on_old_keys", {})
        row.extra.update(
            rotate_runs=runs,
            rotate_s=round(rotate_s, 1),
            resealed_in_redis=rotated.get("redis", 0),
            rewritten_in_log=sum(v for k, v in rotated.items() if k != "redis"),
            left_on_k1_after_rotate=sum(left.values()),
            waiting_when_k1_left=waiting,
            not_exactly_once=_not_exactly_once(ledger, ids),
            failed_for_a_key=_failed_for_a_key(cluster),
            unreadable_with_k2=_unreadable(ids),
            k1_in_redis=RedisRotation(cluster.redis.client()).old_key_holders().total,
            k1_in_log=_on_key_in_log(cluster.env["DATABASE_URL"], "k1"),
        )
        row.require(code == 0, "`jobyard keys rotate` leaves nothing in flight on k1 (exit 0)")
        row.require(waiting > 0, "k1 is removed while jobs still wait (the row's point)")
        row.require(row.extra.get("final_not_succeeded", 0) == 0, "every job succeeds")
        row.require(row.extra["not_exactly_once"] == 0, "each step executes exactly once")
        row.require(row.extra["failed_for_a_key"] == 0, "0 failed for a key")
        row.require(row.extra["unreadable_with_k2"] == 0, "every job reads back with k2 alone")
        row.require(row.extra["k1_in_redis"] + row.extra["k1_in_log"] == 0, "nothing left on k1")
        return row
    finally:
        cluster.close()
        os.environ.pop(env.ENCRYPTION_KEYS, None)
        crypto.reset()


ROWS = [(key_rotation_under_load, {"n_delayed": 1000, "n_parked": 1000})]

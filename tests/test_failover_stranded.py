"""A job whose finish the old primary acknowledged and a failover lost, its worker alive: the
promoted replica has it `running`, its message in that worker's ack set, and the worker has let
it go. The worker takes such messages back once it finds another server behind its address
(jobyard.queue.worker.StrandedSweep): the job runs again and ends, its returned steps read from
the step journal, not run again. Before, it stayed `running` for good (`make chaos`, failover
row, 2026-12-07: 7 of 1,833 jobs)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jobyard.dispatcher import JobHandle, dispatch_job, dispatch_many
from jobyard.queue import keys
from tests.engines import Engines
from tests.sentinel_support import SentinelCluster
from tests.support import wait_for
from tests.test_sentinel import sentinel_cluster, sentinel_engines  # noqa: F401 (fixtures)

#: Queue "default" runs two jobs at once and prefetches four: with three blockers held, its
#: window is full, so its consumer fetches nothing during the failover and never sees it fail
#: (the consumer's own reconnect puts back what it did not hand on; a busy one never
#: reconnects).
CONCURRENCY = 2
BLOCKERS = 3


def _held(cluster: SentinelCluster) -> int:
    """Message ids in the ack sets of queue "default" on the primary."""
    node = cluster.node(cluster.primary())
    return sum(node.scard(k) for k in node.scan_iter(f"{keys.dramatiq_acks_prefix()}*.default"))


def test_a_finish_lost_in_a_failover_is_run_again_without_its_returned_steps(
    sentinel_engines: Engines,  # noqa: F811
    sentinel_cluster: SentinelCluster,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engines, cluster = sentinel_engines, sentinel_cluster
    monkeypatch.setenv("WORKER_CONCURRENCY_DEFAULT", str(CONCURRENCY))
    # No worker is taken for dead while Redis fails over: the jobs' messages stay in the live
    # worker's ack set, as in the chaos row.
    monkeypatch.setenv("WORKER_HEARTBEAT_TIMEOUT", "30")
    engines.start_worker(queues="default")  # with the environment above
    lost_dir, blockers_dir = tmp_path / "lost", tmp_path / "blockers"
    lost_dir.mkdir()
    blockers_dir.mkdir()

    # The job whose finish is lost: one step returned, then it waits in its second for "go".
    lost = dispatch_job("test.progress", {"marker_dir": str(lost_dir)})
    assert lost.engine == "dramatiq"
    wait_for(lambda: (lost_dir / "first-half").exists(), timeout=30)
    # In one Lua call: the worker's next fetch takes them all (it fetches while a thread is
    # free, and only one is).
    blockers = dispatch_many([("test.progress", {"marker_dir": str(blockers_dir)})] * BLOCKERS)
    assert all(isinstance(b, JobHandle) and b.engine == "dramatiq" for b in blockers), blockers
    wait_for(lambda: _held(cluster) == 1 + BLOCKERS, timeout=30)  # all fetched by the worker

    # The replica stops receiving writes; the job finishes on the primary alone.
    old = cluster.primary()
    replica = cluster.replica_port if old == cluster.primary_port else cluster.primary_port
    cluster.cut_replication(replica)
    (lost_dir / "go").touch()
    job_key = keys.job(lost.job_id)
    wait_for(lambda: cluster.node(old).hget(job_key, "state") == b"succeeded", timeout=30)

    cluster.kill(old)
    wait_for(lambda: cluster.primary() == replica, timeout=60, interval=0.1)
    cluster.mend_replication(replica)
    promoted = cluster.node(replica)
    assert promoted.hget(job_key, "state") == b"running"  # the finish is lost

    time.sleep(3)  # the worker finds the promoted replica (its heartbeat reconnects)
    (blockers_dir / "go").touch()
    for blocker in blockers:
        assert isinstance(blocker, JobHandle)
        # Held by the worker all along: never put back (it would have run again, attempts 2).
        ended = engines.wait(blocker.job_id, timeout=60)
        assert (ended.state, ended.attempts <= 1) == ("succeeded", True)

    status = engines.wait(lost.job_id, timeout=30)
    assert (status.engine, status.state) == ("dramatiq", "succeeded"), engines.logs()
    assert status.attempts == 2  # run again from its message ...
    # ... its returned step read from the step journal, not run again.
    assert (lost_dir / "first-half").read_text().splitlines() == ["ran"]
    assert "stranded in this worker's ack set" in engines.logs()

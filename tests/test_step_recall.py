"""A Dramatiq run whose Redis step records may be incomplete reads the step journal too
(may_have_lost in jobyard.lua, DramatiqContext._recall): a step that returned, was committed to
`job_steps`, and whose Redis record was then lost (a worker killed between the two, a record
given up while Redis was down, a Redis restarted without its last writes) does not run again.
A run on the normal path reads no database."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import redis

from jobyard.job_engine.db.steps import StepJournal, load_steps
from jobyard.queue import context, keys
from jobyard.queue.context import DramatiqContext
from jobyard.queue.store import JobStore
from tests.support import RedisServer

NAME = "tests.recall"


class Harness:
    """One job's record in a real Redis, runs of it through DramatiqContext, and the step
    journal in a real (SQLite) database; counts the step's executions and journal reads."""

    def __init__(self, server: RedisServer, database: str) -> None:
        self.server, self.database = server, database
        self.journal = StepJournal(database)
        self.executions = 0
        self.recalls = 0
        self.charge_in_redis: list[bool] = []
        self.enqueued_at = 0
        self.job = f"recall-{uuid.uuid4().hex[:8]}"  # the journal's database is the session's

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, decode_responses=True)

    def dispatch(self) -> None:
        """The job's record as enqueue writes it; again, after a restart: as the AOF kept it."""
        with self.client() as r:
            if not self.enqueued_at:
                seconds, micros = r.time()
                self.enqueued_at = seconds * 1000 + micros // 1000
            r.hset(keys.job(self.job), mapping={
                "name": NAME, "queue": "default", "engine": "dramatiq", "state": "queued",
                "attempts": 0, "seq": 0, "enqueued_at": self.enqueued_at,
            })  # fmt: skip

    def recall(self, job_id: str) -> dict[str, str]:
        self.recalls += 1
        return load_steps([job_id], url=self.database).get(job_id, {})

    def charge(self) -> dict[str, int]:
        self.executions += 1
        return {"charged": 42}

    def mail(self) -> str:
        """A second step: notes whether the first one's record was in Redis when it ran."""
        with self.client() as r:
            self.charge_in_redis.append(r.hexists(keys.steps(self.job), "charge"))
        return "sent"

    def run(self, recall: Callable[[str], dict[str, str]] | None = None) -> object:
        """One run of the job's message (seq 0): its one step."""
        with self.client() as r:
            ctx = DramatiqContext(
                JobStore(r), NAME, self.job, 0, False, journal=self.journal.begin,
                recall=recall or self.recall,
            )  # fmt: skip
            return asyncio.run(ctx.run("charge", self.charge))

    def lose_step_record(self) -> None:
        with self.client() as r:
            r.hdel(keys.steps(self.job), "charge")


def wait_past_redis_start(server: RedisServer) -> None:
    """Until Redis's clock is in a later second than its start (LASTSAVE counts seconds)."""
    with redis.Redis.from_url(server.url) as r:
        boot = int(r.lastsave().timestamp())
        while r.time()[0] <= boot:
            time.sleep(0.05)


def test_a_redelivery_does_not_rerun_a_step_redis_lost(
    redis_server: RedisServer, job_log_database: str
) -> None:
    """The worker died after the journal's commit, before Redis kept the record (or gave the
    record up while Redis was down): the redelivered message's start is a second attempt."""
    h = Harness(redis_server, job_log_database)
    wait_past_redis_start(redis_server)
    h.dispatch()
    assert h.run() == {"charged": 42}
    assert (h.executions, h.recalls) == (1, 0)  # the first run read no database
    h.lose_step_record()
    assert h.run() == {"charged": 42}
    assert (h.executions, h.recalls) == (1, 1)


def test_a_redis_restarted_without_the_run_does_not_rerun_its_step(
    redis_server: RedisServer, job_log_database: str
) -> None:
    """Redis restarted without its last second of writes (AOF everysec), the run's start among
    them, its dispatch kept: the new run is a first attempt, in doubt by the restart alone."""
    h = Harness(redis_server, job_log_database)
    wait_past_redis_start(redis_server)
    h.dispatch()
    h.run()
    redis_server.kill()
    redis_server.start()
    h.dispatch()
    assert h.run() == {"charged": 42}
    assert (h.executions, h.recalls) == (1, 1)


def test_an_unreadable_journal_is_waited_for_then_the_run_goes_on(
    redis_server: RedisServer, job_log_database: str, tmp_path, monkeypatch, caplog
) -> None:
    """A database that cannot be read holds the run for RECALL_PATIENCE, then the run goes on
    with Redis's records alone, logged: the journal is a backstop, not a dependency."""
    monkeypatch.setattr(context, "RECALL_PATIENCE", 0.6)
    h = Harness(redis_server, job_log_database)
    wait_past_redis_start(redis_server)
    h.dispatch()
    h.run()
    h.lose_step_record()
    unmigrated = f"sqlite:///{tmp_path / 'unmigrated.db'}"
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, "jobyard.steps"):
        h.run(recall=lambda job_id: load_steps([job_id], url=unmigrated))
    assert time.monotonic() - began >= 0.6
    assert h.executions == 2
    assert "step journal unreadable" in caplog.text


def test_a_steps_redis_record_waits_for_the_runs_next_call(
    redis_server: RedisServer, job_log_database: str
) -> None:
    """With a journal, a step's Redis record goes with the run's next call (here the next
    step's, after the journal's commit and before that step runs; a run's finish takes it
    along), not in its own."""
    h = Harness(redis_server, job_log_database)
    h.dispatch()

    async def handler(ctx: DramatiqContext) -> None:
        await ctx.run("charge", h.charge)
        with h.client() as r:
            assert not r.hexists(keys.steps(h.job), "charge")
        await ctx.run("mail", h.mail)

    with h.client() as r:
        ctx = DramatiqContext(JobStore(r), NAME, h.job, 0, False, journal=h.journal.begin)
        asyncio.run(handler(ctx))
        assert h.charge_in_redis == [True]
        assert [s for s, _, _ in ctx.unrecorded()] == ["mail"]
        assert ctx.unrecorded() == []
        ctx.settle_unrecorded(recorded=True)
    assert load_steps([h.job], url=h.database)[h.job] == {
        "charge": '{"charged": 42}',
        "mail": '"sent"',
    }


def test_a_step_the_journal_cannot_keep_is_recorded_in_redis_still(
    redis_server: RedisServer, tmp_path
) -> None:
    """The journal's commit failed: the next call records the step in Redis all the same, and
    an ending whose own call failed records it alone."""
    unmigrated = f"sqlite:///{tmp_path / 'unmigrated.db'}"
    h = Harness(redis_server, unmigrated)
    h.dispatch()
    with h.client() as r:
        ctx = DramatiqContext(JobStore(r), NAME, h.job, 0, False, journal=h.journal.begin)
        assert asyncio.run(ctx.run("charge", h.charge)) == {"charged": 42}
        ctx.record_unrecorded()
        assert r.hget(keys.steps(h.job), "charge") == '{"charged": 42}'
        asyncio.run(ctx.run("mail", h.mail))
        assert [s for s, _, _ in ctx.unrecorded()] == ["mail"]
        ctx.settle_unrecorded(recorded=False)  # as after a finish that Redis refused
        assert r.hget(keys.steps(h.job), "mail") == '"sent"'

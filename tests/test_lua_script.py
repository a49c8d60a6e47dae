"""jobyard.lua called directly against a real Redis, one test group per command.

The script is loaded and run with EVALSHA, KEYS built from jobyard.queue.keys and ARGV in the
order store.py passes them, so these tests pin the script's contract (KEYS, ARGV, replies and the
Redis state each command leaves) independently of the Python wrapper."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any
from unittest.mock import ANY

import pytest
import redis

from jobyard.queue import keys
from jobyard.queue.messages import encode_job_message
from tests.support import RedisServer

SCRIPT = resources.files("jobyard.queue").joinpath("jobyard.lua").read_text()

JOB = "job-1"
NAME = "system.echo"
QUEUE = "default"
DELAY_QUEUE = keys.delayed(QUEUE)
BROKER = "broker-1"
WORKER = "worker-1"
TTL = 4321  # seconds; not the store's default, so a TTL seen here came from ARGV
TIMEOUT_MS = 3000

JOB_KEY = keys.job(JOB)
STEPS_KEY = keys.steps(JOB)
WORKERS_KEY = keys.workers(QUEUE)
QUEUE_KEY = keys.dramatiq_queue(QUEUE)
MSGS_KEY = keys.dramatiq_messages(QUEUE)
DELAY_KEY = keys.dramatiq_queue(DELAY_QUEUE)
DELAY_MSGS_KEY = keys.dramatiq_messages(DELAY_QUEUE)
ACKS_KEY = keys.dramatiq_acks(BROKER, QUEUE)
EVENTS_KEY = keys.job_log_events()
QUEUE_KEYS = [QUEUE_KEY, MSGS_KEY, DELAY_KEY, DELAY_MSGS_KEY]


class Lua:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.sha = client.script_load(SCRIPT)

    def __call__(self, command: str, keys_: list[str], *args: Any) -> Any:
        return self.client.evalsha(self.sha, len(keys_), *keys_, command, *args)


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def lua(r: redis.Redis) -> Lua:
    return Lua(r)


def now_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return seconds * 1000 + micros // 1000


def job(r: redis.Redis, key: str = JOB_KEY) -> dict[str, str]:
    return r.hgetall(key)


def seed(r: redis.Redis, key: str = JOB_KEY, **fields: Any) -> None:
    base = {
        "name": NAME,
        "queue": QUEUE,
        "engine": "dramatiq",
        "state": "queued",
        "attempts": 0,
        "seq": 0,
    }
    r.hset(key, mapping={**base, **fields})


def live_worker(r: redis.Redis, worker: str = WORKER, age_ms: int = 0) -> None:
    r.zadd(WORKERS_KEY, {worker: now_ms(r) - age_ms})


def put_message(r: redis.Redis, list_key: str, msgs_key: str, job_id: str = JOB) -> tuple[str, str]:
    message = encode_job_message(NAME, QUEUE, job_id, {"n": 1})
    data = message.data.decode()
    r.hset(msgs_key, message.redis_message_id, data)
    r.rpush(list_key, message.redis_message_id)
    return message.redis_message_id, data


def fetched(r: redis.Redis) -> str:
    """A message a consumer fetched and has not acked: in the acks set and the msgs hash."""
    rmid, _ = put_message(r, QUEUE_KEY, MSGS_KEY)
    r.lrem(QUEUE_KEY, 0, rmid)
    r.sadd(ACKS_KEY, rmid)
    return rmid


def assert_now(value: Any, before: int, after: int) -> None:
    assert before <= int(value) <= after


def assert_logged(r: redis.Redis, before: int, after: int, **expected: Any) -> None:
    """The job log's outbox holds one entry, of this job, timed with Redis's clock ("s.µs"),
    with exactly the `expected` fields besides."""
    entries = r.xrange(EVENTS_KEY)
    assert len(entries) == 1, entries
    fields = dict(entries[0][1])
    assert fields.pop("job") == JOB_KEY
    at = fields.pop("at")
    assert len(at.split(".")[1]) == 6  # µs, zero-padded
    assert before <= float(at) * 1000 < after + 1
    assert fields == {k: str(v) for k, v in expected.items()}


# enqueue: KEYS job, workers, queue list, queue msgs
#          ARGV job_id, rmid, message, name, queue, heartbeat timeout ms, ttl s, options JSON


def enqueue(lua: Lua, rmid: str = "m1", message: str = "data", options: str = "") -> Any:
    return lua(
        "enqueue",
        [JOB_KEY, WORKERS_KEY, QUEUE_KEY, MSGS_KEY],
        JOB,
        rmid,
        message,
        NAME,
        QUEUE,
        TIMEOUT_MS,
        TTL,
        options,
    )


def test_enqueue_with_a_live_worker_queues_the_message(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    before = now_ms(r)
    assert enqueue(lua, options='{"webhook_url": "http://x"}') == ["enqueued"]
    after = now_ms(r)
    record = job(r)
    assert_now(record.pop("enqueued_at"), before, after)
    assert record == {
        "name": NAME,
        "queue": QUEUE,
        "engine": "dramatiq",
        "state": "queued",
        "attempts": "0",
        "seq": "0",
        "rmid": "m1",
        "ttl": str(TTL),  # for terminal states reached where no call passes a TTL
        "options": '{"webhook_url": "http://x"}',
    }
    assert r.ttl(JOB_KEY) == -1  # a live job has no TTL: its sleeps and retries may outlast any
    assert r.lrange(QUEUE_KEY, 0, -1) == ["m1"]
    assert r.hgetall(MSGS_KEY) == {"m1": "data"}


def test_enqueue_without_options_writes_no_options_field(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    assert enqueue(lua) == ["enqueued"]
    assert "options" not in job(r)


def test_enqueue_of_an_existing_job_changes_nothing(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    seed(r, state="running", rmid="old")
    assert enqueue(lua) == ["exists", "dramatiq", "running"]
    assert job(r)["rmid"] == "old"
    assert r.exists(QUEUE_KEY, MSGS_KEY) == 0
    r.delete(JOB_KEY)
    r.hset(JOB_KEY, "engine", "temporal")  # a record without a state replies ""
    assert enqueue(lua) == ["exists", "temporal", ""]


def test_enqueue_with_no_live_worker_writes_a_temporal_tombstone(r: redis.Redis, lua: Lua) -> None:
    live_worker(r, age_ms=TIMEOUT_MS + 1000)  # its heartbeat is older than the timeout
    before = now_ms(r)
    assert enqueue(lua, options='{"retry": 1}') == ["no_workers"]
    after = now_ms(r)
    record = job(r)
    assert_now(record.pop("enqueued_at"), before, after)
    assert record == {"name": NAME, "queue": QUEUE, "engine": "temporal", "state": "queued"}
    assert 0 < r.ttl(JOB_KEY) <= TTL
    assert r.exists(QUEUE_KEY, MSGS_KEY) == 0


# enqueue_many: KEYS workers, queue list, queue msgs, job 1, job 2, ...
#               ARGV queue, heartbeat timeout ms, ttl s, then name, rmid, message, options per job


def enqueue_many(lua: Lua, jobs: list[tuple[str, str, str]]) -> Any:
    """`jobs`: (job id, rmid, options JSON) each; the message is "data-<rmid>"."""
    args: list[Any] = []
    for _, rmid, options in jobs:
        args += [NAME, rmid, f"data-{rmid}", options]
    job_keys = [keys.job(job_id) for job_id, _, _ in jobs]
    return lua(
        "enqueue_many", [WORKERS_KEY, QUEUE_KEY, MSGS_KEY, *job_keys], QUEUE, TIMEOUT_MS, TTL, *args
    )


def test_enqueue_many_queues_each_new_job_in_order_and_reports_each(
    r: redis.Redis, lua: Lua
) -> None:
    live_worker(r)
    seed(r, keys.job("old"), state="running", rmid="old-m")
    before = now_ms(r)
    replies = enqueue_many(
        lua,
        [("a", "m-a", '{"retry": 1}'), ("old", "m-old", ""), ("b", "m-b", ""), ("a", "m-a2", "")],
    )
    after = now_ms(r)
    assert replies == ["enqueued", "exists:dramatiq:running", "enqueued", "exists:dramatiq:queued"]
    assert r.lrange(QUEUE_KEY, 0, -1) == ["m-a", "m-b"]
    assert r.hgetall(MSGS_KEY) == {"m-a": "data-m-a", "m-b": "data-m-b"}
    record = job(r, keys.job("a"))
    assert_now(record.pop("enqueued_at"), before, after)
    assert record == {
        "name": NAME, "queue": QUEUE, "engine": "dramatiq", "state": "queued", "attempts": "0",
        "seq": "0", "rmid": "m-a", "ttl": str(TTL), "options": '{"retry": 1}',
    }  # fmt: skip
    assert "options" not in job(r, keys.job("b"))
    assert job(r, keys.job("old"))["rmid"] == "old-m"


def test_enqueue_many_with_no_live_worker_writes_tombstones(r: redis.Redis, lua: Lua) -> None:
    live_worker(r, age_ms=TIMEOUT_MS + 1000)
    seed(r, keys.job("old"), engine="temporal", state="running")
    replies = enqueue_many(lua, [("a", "m-a", ""), ("old", "m-old", ""), ("b", "m-b", "")])
    assert replies == ["no_workers", "exists:temporal:running", "no_workers"]
    for job_id in ("a", "b"):
        assert job(r, keys.job(job_id))["engine"] == "temporal"
        assert 0 < r.ttl(keys.job(job_id)) <= TTL
    assert r.exists(QUEUE_KEY, MSGS_KEY) == 0


def test_enqueue_many_of_new_jobs_writes_what_the_per_job_path_writes(
    r: redis.Redis, lua: Lua
) -> None:
    """A batch of jobs none of which exists takes one EXISTS for the batch and replies with its
    size; each record, the queue's order and the messages are those of the per-job path (a
    batch with one existing job takes that)."""
    live_worker(r)
    jobs = [(f"new{n}", f"m-new{n}", '{"retry": 1}' if n % 2 else "") for n in range(5)]
    assert enqueue_many(lua, jobs) == 5
    seed(r, keys.job("old"), state="running", rmid="old-m")
    twins = [(f"twin{n}", f"m-twin{n}", options) for n, (_, _, options) in enumerate(jobs)]
    replies = enqueue_many(lua, [*twins, ("old", "m-old", "")])
    assert replies == ["enqueued"] * 5 + ["exists:dramatiq:running"]
    for (job_id, rmid, _), (twin, twin_rmid, _) in zip(jobs, twins, strict=True):
        record, twin_record = job(r, keys.job(job_id)), job(r, keys.job(twin))
        assert abs(int(record.pop("enqueued_at")) - int(twin_record.pop("enqueued_at"))) < 1000
        assert (record.pop("rmid"), twin_record.pop("rmid")) == (rmid, twin_rmid)
        assert record == twin_record
        assert r.ttl(keys.job(job_id)) == -1
    assert r.lrange(QUEUE_KEY, 0, -1) == [rmid for _, rmid, _ in jobs + twins]
    assert r.hgetall(MSGS_KEY) == {rmid: f"data-{rmid}" for _, rmid, _ in jobs + twins}


def test_enqueue_many_of_new_jobs_lists_a_job_given_twice_once(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    replies = enqueue_many(lua, [("a", "m-a", ""), ("b", "m-b", ""), ("a", "m-a2", "")])
    assert replies == ["enqueued", "enqueued", "exists:dramatiq:queued"]
    assert r.lrange(QUEUE_KEY, 0, -1) == ["m-a", "m-b"]
    assert job(r, keys.job("a"))["rmid"] == "m-a"


def test_enqueue_many_of_new_jobs_beyond_one_unpack(r: redis.Redis, lua: Lua) -> None:
    """More keys and messages than one call spreads (2000): every job is written, in order."""
    live_worker(r)
    jobs = [(f"big{n}", f"m-big{n}", "") for n in range(2100)]
    assert enqueue_many(lua, jobs) == 2100
    assert r.lrange(QUEUE_KEY, 0, -1) == [rmid for _, rmid, _ in jobs]
    assert r.hlen(MSGS_KEY) == 2100
    assert all(r.exists(keys.job(job_id)) for job_id, _, _ in jobs)
    jobs[-1] = ("big0", "m-again", "")  # one existing job among them: each reply its own
    replies = enqueue_many(lua, [(f"more{n}", f"m-more{n}", "") for n in range(5)] + jobs[-1:])
    assert replies == ["enqueued"] * 5 + ["exists:dramatiq:queued"]


def test_enqueue_many_of_new_jobs_with_no_live_worker_writes_tombstones(
    r: redis.Redis, lua: Lua
) -> None:
    replies = enqueue_many(lua, [("a", "m-a", ""), ("b", "m-b", "")])
    assert replies == ["no_workers", "no_workers"]
    assert job(r, keys.job("a"))["engine"] == "temporal"
    assert r.exists(QUEUE_KEY, MSGS_KEY) == 0


# start: KEYS job, steps [, events]
#        ARGV seq, is_resume


def start(
    lua: Lua,
    seq: int = 0,
    resume: str = "0",
    changes: bool = False,
    job_id: str = JOB,
) -> Any:
    keys_ = [keys.job(job_id), keys.steps(job_id), keys.lost_writes_before()]
    return lua("start", keys_ + ([EVENTS_KEY] if changes else []), seq, resume)


def test_start_says_steps_may_be_lost_for_a_job_dispatched_before_a_seen_failover(
    r: redis.Redis, lua: Lua
) -> None:
    """A promoted replica may lack the old primary's last step records: a job dispatched before
    the failover a client saw (jobyard:lost_writes_before) reads the journal too; one
    dispatched after it does not."""
    dispatched = now_ms(r) + 60_000  # after this server's start (LASTSAVE)
    seed(r, enqueued_at=dispatched)
    assert start(lua)[3] == 0
    r.set(keys.lost_writes_before(), dispatched + 1)
    seed(r, enqueued_at=dispatched)
    assert start(lua)[3] == 1
    seed(r, enqueued_at=dispatched + 2)
    assert start(lua)[3] == 0


def test_start_runs_the_job_and_returns_its_recorded_steps(r: redis.Redis, lua: Lua) -> None:
    seed(r)
    r.hset(STEPS_KEY, mapping={"fetch": '{"a": 1}', "parse": "2"})
    before = now_ms(r)
    reply = start(lua)
    after = now_ms(r)
    assert reply[:2] == ["ok", 1]
    assert_now(reply[2], before, after)
    assert dict(zip(reply[4::2], reply[5::2], strict=True)) == {"fetch": '{"a": 1}', "parse": "2"}
    record = job(r)
    assert (record["state"], record["attempts"], record["started_seq"]) == ("running", "1", "0")
    assert record["started_at"] == str(reply[2])
    assert not r.exists(EVENTS_KEY)  # no changes key passed: the job log is off


def test_start_says_when_step_records_may_have_been_lost(r: redis.Redis, lua: Lua) -> None:
    # A job dispatched to this Redis, on its first run: no doubt (no database read).
    boot = r.lastsave().timestamp()
    while r.time()[0] <= boot:  # LASTSAVE counts seconds
        time.sleep(0.05)
    seed(r, enqueued_at=now_ms(r))
    assert start(lua)[3] == 0
    # Its message delivered again (its worker died): a second attempt, in doubt.
    assert start(lua)[3] == 1
    # A first run of a job dispatched before this Redis started: in doubt too.
    seed(r, key=keys.job("older"), enqueued_at=int(boot * 1000) - 1)
    assert start(lua, job_id="older")[:4] == ["ok", 1, ANY, 1]
    seed(r, key=keys.job("same-second"), enqueued_at=int(boot * 1000) + 999)
    assert start(lua, job_id="same-second")[3] == 1


def test_start_logs_the_change_when_given_the_events_key(r: redis.Redis, lua: Lua) -> None:
    seed(r, enqueued_at=900)
    before = now_ms(r)
    reply = start(lua, changes=True)
    assert reply[0] == "ok"
    assert_logged(
        r, before, now_ms(r), state="running", name=NAME, queue=QUEUE, attempts=1,
        enqueued_at=900, started_at=reply[2],
    )  # fmt: skip


def test_start_counts_attempts(r: redis.Redis, lua: Lua) -> None:
    # A retry (is_resume 0) is a new attempt; the first start time is kept.
    seed(r, state="retrying", seq=1, attempts=1, started_seq=0, started_at=1000)
    assert start(lua, seq=1)[:3] == ["ok", 2, "1000"]
    # A resume after a durable sleep continues the same attempt.
    r.hset(JOB_KEY, mapping={"seq": 2})
    assert start(lua, seq=2, resume="1")[:3] == ["ok", 2, "1000"]
    assert job(r)["started_seq"] == "2"
    # The same resume delivered again (its worker died after starting it) is a new attempt.
    assert start(lua, seq=2, resume="1")[:3] == ["ok", 3, "1000"]
    assert job(r)["attempts"] == "3"


@pytest.mark.parametrize(
    ("fields", "reply"),
    [
        (None, ["lost"]),
        ({"engine": "temporal"}, ["lost"]),
        ({"state": "succeeded"}, ["done"]),
        ({"state": "failed"}, ["done"]),
        ({"state": "dead"}, ["done"]),
        ({"state": "cancelled"}, ["done"]),
        ({"seq": 1}, ["stale"]),
    ],
)
def test_start_refuses_a_message_that_may_not_run(
    r: redis.Redis, lua: Lua, fields: dict[str, Any] | None, reply: list[str]
) -> None:
    if fields is not None:
        seed(r, **fields)
    before = job(r)
    assert start(lua, changes=True) == reply
    assert job(r) == before
    assert not r.exists(EVENTS_KEY)


def test_start_of_a_job_asked_to_cancel_cancels_it(r: redis.Redis, lua: Lua) -> None:
    seed(r, cancel="1", ttl=TTL)
    before = now_ms(r)
    assert start(lua, changes=True) == ["cancelled"]
    after = now_ms(r)
    record = job(r)
    assert record["state"] == "cancelled"
    assert 0 < r.ttl(JOB_KEY) <= TTL  # a cancelled record expires like any finished one
    assert_now(record["finished_at"], before, after)
    assert "started_at" not in record and record["attempts"] == "0"
    assert_logged(r, before, after, state="cancelled", name=NAME, queue=QUEUE, attempts=0)


def test_start_clears_a_flow_control_hold(r: redis.Redis, lua: Lua) -> None:
    """Rate limits are the permit store's now (jobyard.job_engine.flow): start only clears
    what a held job showed."""
    seed(r)
    r.hset(JOB_KEY, mapping={"hold_state": "throttled", "hold_reason": "rate limit x"})
    assert start(lua)[0] == "ok"
    record = job(r)
    assert "hold_state" not in record and "hold_reason" not in record
    assert r.keys("jobyard:rate:*") == []


# step: KEYS job, steps   ARGV seq, step name, JSON result, ttl s


def step(lua: Lua, seq: int = 0, name: str = "fetch", value: str = '{"ok": true}') -> Any:
    return lua("step", [JOB_KEY, STEPS_KEY], seq, name, value, TTL)


def test_step_records_the_result_with_a_ttl(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running")
    assert step(lua) == "ok"
    assert step(lua, name="parse", value="3") == "ok"
    assert r.hgetall(STEPS_KEY) == {"fetch": '{"ok": true}', "parse": "3"}
    assert 0 < r.ttl(STEPS_KEY) <= TTL


@pytest.mark.parametrize("fields", [None, {"engine": "temporal"}, {"seq": 1}])
def test_step_of_a_job_no_longer_ours_is_lost(
    r: redis.Redis, lua: Lua, fields: dict[str, Any] | None
) -> None:
    if fields is not None:
        seed(r, state="running", **fields)
    assert step(lua) == "lost"
    assert not r.exists(STEPS_KEY)


def test_step_of_a_job_asked_to_cancel_is_recorded_then_stops(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running", cancel="1")
    assert step(lua) == "cancel"
    assert r.hgetall(STEPS_KEY) == {"fetch": '{"ok": true}'}
    assert job(r)["state"] == "running"


# progress: KEYS job [, events]   ARGV seq, JSON progress


def test_progress_is_recorded_and_logged(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running")
    assert lua("progress", [JOB_KEY], 0, '{"pct": 10}') == "ok"
    assert job(r)["progress"] == '{"pct": 10}'
    assert not r.exists(EVENTS_KEY)
    before = now_ms(r)
    assert lua("progress", [JOB_KEY, EVENTS_KEY], 0, '{"pct": 20}') == "ok"
    assert job(r)["progress"] == '{"pct": 20}'
    assert_logged(r, before, now_ms(r), progress='{"pct": 20}')


def test_progress_of_another_run_is_lost(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running", seq=2)
    assert lua("progress", [JOB_KEY, EVENTS_KEY], 1, '{"pct": 10}') == "lost"
    assert "progress" not in job(r)
    assert not r.exists(EVENTS_KEY)


# mark_running: KEYS job [, events]   ARGV seq


@pytest.mark.parametrize("state", ["queued", "retrying"])
def test_mark_running_shows_the_run_without_counting_it(
    r: redis.Redis, lua: Lua, state: str
) -> None:
    seed(r, state=state, seq=2, attempts=1, enqueued_at=500)
    before = now_ms(r)
    assert lua("mark_running", [JOB_KEY, EVENTS_KEY], 2) == 1
    after = now_ms(r)
    record = job(r)
    assert record["state"] == "running" and record["attempts"] == "1"
    assert "started_seq" not in record  # the run's own start or complete counts the attempt
    assert_now(record["started_at"], before, after)
    assert_logged(
        r, before, after, state="running", name=NAME, queue=QUEUE, attempts=2,
        enqueued_at=500, started_at=record["started_at"],
    )  # fmt: skip
    assert complete(lua, seq=2) == ["ok", 2, record["started_at"]]


def test_mark_running_keeps_the_first_start(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="retrying", started_at=1000)
    assert lua("mark_running", [JOB_KEY], 0) == 1
    assert job(r)["started_at"] == "1000"
    assert not r.exists(EVENTS_KEY)


@pytest.mark.parametrize(
    "fields",
    [
        None,
        {"engine": "temporal"},
        {"seq": 4},
        {"state": "running"},
        {"state": "succeeded"},
        {"cancel": "1"},
    ],
)
def test_mark_running_leaves_what_it_may_not_mark(
    r: redis.Redis, lua: Lua, fields: dict[str, Any] | None
) -> None:
    if fields is not None:
        seed(r, **fields)
    before = job(r)
    assert lua("mark_running", [JOB_KEY, EVENTS_KEY], 0) == 0
    assert job(r) == before
    assert not r.exists(EVENTS_KEY)


# finish: KEYS job, steps, acks, msgs [, events]
#         ARGV seq, state, result JSON, error, error class, ttl s, rmid, payload JSON, traceback
#              [, step name, JSON result, JSON timing]...


def finish(
    lua: Lua,
    seq: int = 0,
    state: str = "succeeded",
    rmid: str = "",
    payload: str = "",
    traceback: str = "",
    error: str = "",
    changes: bool = False,
    steps: tuple[str, ...] = (),
) -> Any:
    keys_ = [JOB_KEY, STEPS_KEY, ACKS_KEY, MSGS_KEY] + ([EVENTS_KEY] if changes else [])
    return lua(
        "finish",
        keys_,
        seq,
        state,
        '{"r": 1}',
        error,
        "ValueError" if error else "",
        TTL,
        rmid,
        payload,
        traceback,
        *steps,
    )


def test_finish_records_the_outcome_acks_and_expires(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running", started_at=1000)
    r.hset(STEPS_KEY, "fetch", "1")
    rmid = fetched(r)
    before = now_ms(r)
    assert finish(lua, rmid=rmid) == "ok"
    after = now_ms(r)
    record = job(r)
    assert_now(record.pop("finished_at"), before, after)
    assert {k: record[k] for k in ("state", "result", "error", "error_class")} == {
        "state": "succeeded",
        "result": '{"r": 1}',
        "error": "",
        "error_class": "",
    }
    assert "payload" not in record and "traceback" not in record
    assert 0 < r.ttl(JOB_KEY) <= TTL and 0 < r.ttl(STEPS_KEY) <= TTL
    assert not r.sismember(ACKS_KEY, rmid) and not r.hexists(MSGS_KEY, rmid)
    assert not r.exists(EVENTS_KEY)


def test_finish_of_a_failure_keeps_payload_and_traceback_and_logs(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running", attempts=2, started_at=1000)
    before = now_ms(r)
    reply = finish(
        lua,
        state="failed",
        payload='{"n": 1}',
        traceback="Traceback ...",
        error="boom",
        changes=True,
    )
    assert reply == "ok"
    record = job(r)
    assert (record["state"], record["error"], record["error_class"]) == (
        "failed",
        "boom",
        "ValueError",
    )
    assert (record["payload"], record["traceback"]) == ('{"n": 1}', "Traceback ...")
    assert_logged(
        r, before, now_ms(r), state="failed", name=NAME, queue=QUEUE, attempts=2,
        started_at=1000, error="boom", error_class="ValueError", traceback="Traceback ...",
        payload='{"n": 1}',
    )  # fmt: skip


def test_finish_with_steps_after_a_cancel_was_asked_for_ends_cancelled(
    r: redis.Redis, lua: Lua
) -> None:
    """The run's last step's record comes with the finish (DramatiqContext.unrecorded): that
    call is the step boundary where a cancel asked for during the step stops the run."""
    seed(r, state="running", started_at=1000, cancel="1")
    assert finish(lua, steps=("last", '{"v": 1}', "{}")) == "cancelled"
    record = job(r)
    assert (record["state"], record["result"]) == ("cancelled", "null")
    assert r.hget(STEPS_KEY, "last") == '{"v": 1}'
    # Without steps to record the run had passed its last boundary: the outcome stands.
    seed(r, state="running", started_at=1000, cancel="1")
    assert finish(lua) == "ok"
    assert job(r)["state"] == "succeeded"


def test_finish_of_a_success_logs_its_result(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running", attempts=1, started_at=1000)
    before = now_ms(r)
    assert finish(lua, changes=True) == "ok"
    assert_logged(
        r, before, now_ms(r), state="succeeded", name=NAME, queue=QUEUE, attempts=1,
        started_at=1000, result='{"r": 1}',
    )  # fmt: skip


def test_finish_records_the_steps_it_is_given_with_their_timing(r: redis.Redis, lua: Lua) -> None:
    """The run's last returned steps, kept by the step journal, recorded with the outcome."""
    seed(r, state="running", started_at=1000)
    r.hset(STEPS_KEY, "fetch", "1")
    steps = ("charge", '{"c": 2}', '{"start": 1}', "mail", "3", '{"start": 2}')
    assert finish(lua, steps=steps) == "ok"
    assert r.hgetall(STEPS_KEY) == {
        "fetch": "1", "charge": '{"c": 2}', "__timing__:charge": '{"start": 1}',
        "mail": "3", "__timing__:mail": '{"start": 2}',
    }  # fmt: skip
    assert 0 < r.ttl(STEPS_KEY) <= TTL


def test_finish_acks_only_a_message_the_consumer_holds(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running")
    rmid, data = put_message(r, QUEUE_KEY, MSGS_KEY)  # waiting, not fetched: not in acks
    assert finish(lua, rmid=rmid) == "ok"
    assert r.hget(MSGS_KEY, rmid) == data


@pytest.mark.parametrize("fields", [None, {"engine": "temporal"}, {"seq": 1}])
def test_finish_of_a_job_no_longer_ours_is_lost_but_still_acks(
    r: redis.Redis, lua: Lua, fields: dict[str, Any] | None
) -> None:
    if fields is not None:
        seed(r, state="running", **fields)
    before = job(r)
    rmid = fetched(r)
    assert finish(lua, rmid=rmid, changes=True, steps=("charge", "1", "{}")) == "lost"
    assert job(r) == before
    assert not r.exists(STEPS_KEY)
    assert r.ttl(JOB_KEY) in (-1, -2)
    assert not r.sismember(ACKS_KEY, rmid) and not r.hexists(MSGS_KEY, rmid)
    assert not r.exists(EVENTS_KEY)


# complete: KEYS job, steps, acks, msgs [, events]   ARGV seq, is_resume, result JSON, ttl s, rmid


def complete(
    lua: Lua, seq: int = 0, resume: str = "0", rmid: str = "", changes: bool = False
) -> Any:
    keys_ = [JOB_KEY, STEPS_KEY, ACKS_KEY, MSGS_KEY] + ([EVENTS_KEY] if changes else [])
    return lua("complete", keys_, seq, resume, '{"r": 2}', TTL, rmid)


def test_complete_starts_finishes_and_acks_in_one_call(r: redis.Redis, lua: Lua) -> None:
    seed(r)
    rmid = fetched(r)
    before = now_ms(r)
    reply = complete(lua, rmid=rmid, changes=True)
    after = now_ms(r)
    assert reply[:2] == ["ok", 1]
    assert_now(reply[2], before, after)
    record = job(r)
    assert {k: record[k] for k in ("state", "result", "attempts", "started_seq")} == {
        "state": "succeeded",
        "result": '{"r": 2}',
        "attempts": "1",
        "started_seq": "0",
    }
    assert record["started_at"] == str(reply[2])
    assert_now(record["finished_at"], before, after)
    assert 0 < r.ttl(JOB_KEY) <= TTL
    assert not r.exists(STEPS_KEY)
    assert not r.sismember(ACKS_KEY, rmid) and not r.hexists(MSGS_KEY, rmid)
    assert_logged(
        r, before, after, state="succeeded", name=NAME, queue=QUEUE, attempts=1,
        started_at=reply[2], result='{"r": 2}',
    )  # fmt: skip


def test_complete_keeps_the_first_start_and_counts_attempts(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running", seq=3, attempts=2, started_seq=2, started_at=1000)
    assert complete(lua, seq=3, resume="1") == ["ok", 2, "1000"]
    assert job(r)["started_at"] == "1000"
    assert not r.exists(EVENTS_KEY)


@pytest.mark.parametrize(
    ("fields", "reply"),
    [
        (None, ["lost"]),
        ({"engine": "temporal"}, ["lost"]),
        ({"state": "dead"}, ["done"]),
        ({"seq": 4}, ["stale"]),
    ],
)
def test_complete_refused_changes_nothing_but_acks(
    r: redis.Redis, lua: Lua, fields: dict[str, Any] | None, reply: list[str]
) -> None:
    if fields is not None:
        seed(r, **fields)
    before = job(r)
    rmid = fetched(r)
    assert complete(lua, rmid=rmid, changes=True) == reply
    assert job(r) == before
    assert not r.sismember(ACKS_KEY, rmid) and not r.hexists(MSGS_KEY, rmid)
    assert not r.exists(EVENTS_KEY)


def test_complete_of_a_job_asked_to_cancel_cancels_it(r: redis.Redis, lua: Lua) -> None:
    seed(r, cancel="1")
    before = now_ms(r)
    assert complete(lua, changes=True) == ["cancelled"]
    record = job(r)
    assert record["state"] == "cancelled" and "result" not in record
    assert r.ttl(JOB_KEY) == -1
    assert_logged(r, before, now_ms(r), state="cancelled", name=NAME, queue=QUEUE, attempts=0)


# reschedule: KEYS job, delay list, delay msgs, acks, msgs [, events]
#             ARGV seq, next seq, state, new rmid, message, error, error class, current rmid,
#                  when the next message is due (ms)


def reschedule(
    lua: Lua, seq: int = 0, rmid: str = "", changes: bool = False, run_at: int = 0
) -> Any:
    keys_ = [JOB_KEY, DELAY_KEY, DELAY_MSGS_KEY, ACKS_KEY, MSGS_KEY]
    return lua(
        "reschedule",
        keys_ + ([EVENTS_KEY] if changes else []),
        seq,
        seq + 1,
        "retrying",
        "next",
        "next-data",
        "boom",
        "ValueError",
        rmid,
        run_at,
    )


def test_reschedule_moves_the_job_to_its_next_message(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running", rmid="first", attempts=1)
    rmid = fetched(r)
    before = now_ms(r)
    assert reschedule(lua, rmid=rmid, changes=True, run_at=5000) == "ok"
    record = job(r)
    assert {k: record[k] for k in ("seq", "state", "rmid", "error", "error_class")} == {
        "seq": "1",
        "state": "retrying",
        "rmid": "next",
        "error": "boom",
        "error_class": "ValueError",
    }
    assert r.lrange(DELAY_KEY, 0, -1) == ["next"]
    assert r.hgetall(DELAY_MSGS_KEY) == {"next": "next-data"}
    assert not r.sismember(ACKS_KEY, rmid) and not r.hexists(MSGS_KEY, rmid)
    assert r.ttl(JOB_KEY) == -1
    assert_logged(
        r, before, now_ms(r), state="retrying", name=NAME, queue=QUEUE, attempts=1,
        run_at=5000, error="boom", error_class="ValueError",
    )  # fmt: skip


def test_reschedule_of_a_waiting_job_shows_what_it_waits_for_on_the_delay_queue(
    r: redis.Redis, lua: Lua
) -> None:
    """A job waiting for children or an event (ARGV "delayed") parks on the delay queue as a
    sleep does, its record showing the wait until its next start clears it."""
    seed(r, state="running")
    keys_ = [JOB_KEY, DELAY_KEY, DELAY_MSGS_KEY, ACKS_KEY, MSGS_KEY]
    reply = lua(
        "reschedule", keys_, 0, 1, "running", "next", "next-data", "", "", "", 5000,
        "waiting for 3 children", "children a, b, c", "delayed",
    )  # fmt: skip
    assert reply == "ok"
    assert r.lrange(DELAY_KEY, 0, -1) == ["next"]
    record = job(r)
    assert (record["hold_state"], record["hold_reason"]) == (
        "waiting for 3 children",
        "children a, b, c",
    )
    assert start(lua, seq=1, resume="1")[0] == "ok"
    assert "hold_state" not in job(r) and "hold_reason" not in job(r)


def test_reschedule_without_the_events_key_logs_nothing(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running")
    assert reschedule(lua) == "ok"
    assert not r.exists(EVENTS_KEY)


@pytest.mark.parametrize("fields", [None, {"engine": "temporal"}, {"seq": 5}])
def test_reschedule_of_a_job_no_longer_ours_is_lost_but_still_acks(
    r: redis.Redis, lua: Lua, fields: dict[str, Any] | None
) -> None:
    if fields is not None:
        seed(r, state="running", **fields)
    before = job(r)
    rmid = fetched(r)
    assert reschedule(lua, rmid=rmid, changes=True) == "lost"
    assert job(r) == before
    assert r.exists(DELAY_KEY, DELAY_MSGS_KEY, EVENTS_KEY) == 0
    assert not r.sismember(ACKS_KEY, rmid) and not r.hexists(MSGS_KEY, rmid)


# handoff: KEYS job, queue list, queue msgs, delay list, delay msgs   ARGV name, queue, ttl s


def handoff(lua: Lua) -> Any:
    return lua("handoff", [JOB_KEY, *QUEUE_KEYS], NAME, QUEUE, TTL)


def test_handoff_of_an_unknown_job_writes_a_temporal_tombstone(r: redis.Redis, lua: Lua) -> None:
    before = now_ms(r)
    assert handoff(lua) == ["claimed"]
    record = job(r)
    assert_now(record.pop("enqueued_at"), before, now_ms(r))
    assert record == {"name": NAME, "queue": QUEUE, "engine": "temporal", "state": "queued"}
    assert 0 < r.ttl(JOB_KEY) <= TTL


def test_handoff_of_a_temporal_job_claims_it_unchanged(r: redis.Redis, lua: Lua) -> None:
    seed(r, engine="temporal", state="running")
    assert handoff(lua) == ["claimed"]
    assert job(r)["state"] == "running" and r.ttl(JOB_KEY) == -1


@pytest.mark.parametrize("where", ["queue", "delay"])
def test_handoff_of_a_waiting_job_removes_its_message(r: redis.Redis, lua: Lua, where: str) -> None:
    list_key, msgs_key = (QUEUE_KEY, MSGS_KEY) if where == "queue" else (DELAY_KEY, DELAY_MSGS_KEY)
    other, other_data = put_message(r, list_key, msgs_key, job_id="other")
    rmid, _ = put_message(r, list_key, msgs_key)
    seed(r, rmid=rmid)
    assert handoff(lua) == ["claimed"]
    assert job(r)["engine"] == "temporal"
    assert r.lrange(list_key, 0, -1) == [other]
    assert r.hgetall(msgs_key) == {other: other_data}


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({"state": "running"}, "running"),
        ({"started_at": 1000}, "queued"),
        ({"state": "succeeded"}, "succeeded"),
    ],
)
def test_handoff_of_a_started_job_is_lost(
    r: redis.Redis, lua: Lua, fields: dict[str, Any], state: str
) -> None:
    rmid, data = put_message(r, QUEUE_KEY, MSGS_KEY)
    seed(r, rmid=rmid, **fields)
    assert handoff(lua) == ["lost", state]
    assert job(r)["engine"] == "dramatiq"
    assert r.lrange(QUEUE_KEY, 0, -1) == [rmid] and r.hget(MSGS_KEY, rmid) == data


# cancel: KEYS job, queue list, queue msgs, delay list, delay msgs   ARGV ttl s


def cancel(lua: Lua) -> Any:
    return lua("cancel", [JOB_KEY, *QUEUE_KEYS], TTL)


def test_cancel_of_unknown_temporal_and_finished_jobs(r: redis.Redis, lua: Lua) -> None:
    assert cancel(lua) == ["missing"]
    assert not r.exists(JOB_KEY)
    seed(r, engine="temporal")
    assert cancel(lua) == ["temporal"]
    for state in ("succeeded", "failed", "dead", "cancelled"):
        seed(r, state=state)
        assert cancel(lua) == ["done", state]
        assert "finished_at" not in job(r) and r.ttl(JOB_KEY) == -1


@pytest.mark.parametrize(
    ("state", "where"), [("queued", "queue"), ("retrying", "delay"), ("running", "delay")]
)
def test_cancel_of_a_waiting_job_cancels_it_at_once(
    r: redis.Redis, lua: Lua, state: str, where: str
) -> None:
    # ("running" on the delay queue: parked in a durable sleep.)
    list_key, msgs_key = (QUEUE_KEY, MSGS_KEY) if where == "queue" else (DELAY_KEY, DELAY_MSGS_KEY)
    other, other_data = put_message(r, list_key, msgs_key, job_id="other")
    rmid, _ = put_message(r, list_key, msgs_key)
    seed(r, state=state, rmid=rmid)
    before = now_ms(r)
    assert cancel(lua) == ["cancelled"]
    record = job(r)
    assert record["state"] == "cancelled" and "cancel" not in record
    assert_now(record["finished_at"], before, now_ms(r))
    assert 0 < r.ttl(JOB_KEY) <= TTL
    assert r.lrange(list_key, 0, -1) == [other]
    assert r.hgetall(msgs_key) == {other: other_data}


def test_cancel_of_a_running_job_asks_it_to_stop(r: redis.Redis, lua: Lua) -> None:
    rmid = fetched(r)
    seed(r, state="running", rmid=rmid)
    assert cancel(lua) == ["requested"]
    record = job(r)
    assert (record["state"], record["cancel"]) == ("running", "1")
    assert "finished_at" not in record and r.ttl(JOB_KEY) == -1
    assert r.hexists(MSGS_KEY, rmid)


# replay: KEYS job, queue list, queue msgs   ARGV expected seq, rmid, message


def replay(lua: Lua, seq: int = 1) -> Any:
    return lua("replay", [JOB_KEY, QUEUE_KEY, MSGS_KEY], seq, "again", "again-data")


def test_replay_of_unknown_temporal_active_and_conflicting_jobs(r: redis.Redis, lua: Lua) -> None:
    assert replay(lua) == ["missing"]
    seed(r, engine="temporal", state="failed")
    assert replay(lua) == ["temporal"]
    for state in ("queued", "running", "retrying", "succeeded"):
        seed(r, state=state)
        assert replay(lua) == ["active", state]
    seed(r, state="dead", seq=3)
    assert replay(lua, seq=3) == ["conflict"]  # not seq + 1: another replay got there first
    assert replay(lua, seq=5) == ["conflict"]
    assert job(r)["state"] == "dead"
    assert r.exists(QUEUE_KEY, MSGS_KEY) == 0


@pytest.mark.parametrize("state", ["failed", "dead", "cancelled"])
def test_replay_runs_a_finished_job_again(r: redis.Redis, lua: Lua, state: str) -> None:
    seed(
        r,
        state=state,
        seq=2,
        attempts=3,
        started_seq=2,
        started_at=1000,
        finished_at=2000,
        cancel="1",
        traceback="tb",
        error="boom",
        error_class="E",
        result="null",
        payload='{"n": 1}',
        rmid="old",
    )
    r.expire(JOB_KEY, TTL)
    r.hset(STEPS_KEY, "fetch", "1")
    before = now_ms(r)
    assert replay(lua, seq=3) == ["ok"]
    record = job(r)
    assert_now(record.pop("enqueued_at"), before, now_ms(r))
    assert record == {
        "name": NAME,
        "queue": QUEUE,
        "engine": "dramatiq",
        "state": "queued",
        "seq": "3",
        "rmid": "again",
        "attempts": "0",
        "error": "",
        "error_class": "",
        "result": "",
        "started_at": "1000",
        "payload": '{"n": 1}',
    }
    assert r.ttl(JOB_KEY) == -1
    assert r.hgetall(STEPS_KEY) == {"fetch": "1"}  # finished steps stay recorded
    assert r.lrange(QUEUE_KEY, 0, -1) == ["again"]
    assert r.hgetall(MSGS_KEY) == {"again": "again-data"}


def test_replay_of_a_job_without_seq_expects_one(r: redis.Redis, lua: Lua) -> None:
    r.hset(JOB_KEY, mapping={"engine": "dramatiq", "state": "failed"})
    assert replay(lua, seq=1) == ["ok"]
    assert job(r)["seq"] == "1"


# rescue: KEYS workers, queue list, queue msgs, delay list, delay msgs, handoff list
#         ARGV timeout ms, limit, job prefix


def rescue(lua: Lua, limit: int = 500) -> Any:
    keys_ = [WORKERS_KEY, *QUEUE_KEYS, keys.handoff()]
    return lua("rescue", keys_, TIMEOUT_MS, limit, keys.job_prefix())


def test_rescue_leaves_a_queue_with_a_live_worker(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    rmid, _ = put_message(r, QUEUE_KEY, MSGS_KEY)
    seed(r, rmid=rmid)
    assert rescue(lua) == 0
    assert r.lrange(QUEUE_KEY, 0, -1) == [rmid] and job(r)["engine"] == "dramatiq"
    assert not r.exists(keys.handoff())


def test_rescue_moves_unfinished_jobs_waiting_or_delayed_of_a_worker_less_queue(
    r: redis.Redis, lua: Lua
) -> None:
    """Waiting, started (their steps go along, see DramatiqEngine.collect_orphans) and delayed
    jobs move; finished, Temporal's, stale copies and jobs being cancelled stay."""
    live_worker(r, age_ms=TIMEOUT_MS + 1000)
    ids = {}
    for job_id, fields, on_delay in [
        ("fresh", {}, False),
        ("started", {"started_at": 1000, "state": "retrying"}, False),
        ("running", {"state": "running"}, False),
        ("temporal", {"engine": "temporal"}, False),
        ("stale", {"seq": 4}, False),
        ("cancelling", {"state": "running", "cancel": "1"}, False),
        ("done", {"state": "succeeded"}, False),
        ("sleeping", {"state": "running", "started_at": 1000}, True),
    ]:
        list_key, msgs_key = (DELAY_KEY, DELAY_MSGS_KEY) if on_delay else (QUEUE_KEY, MSGS_KEY)
        ids[job_id] = put_message(r, list_key, msgs_key, job_id=job_id)
        seed(r, keys.job(job_id), rmid=ids[job_id][0], **fields)
    ids["unknown"] = put_message(r, QUEUE_KEY, MSGS_KEY, job_id="unknown")  # no job record
    r.rpush(QUEUE_KEY, "no-data")  # an id whose message is gone
    assert rescue(lua) == 4
    moved = ["fresh", "started", "running", "sleeping"]
    assert r.lrange(keys.handoff(), 0, -1) == [ids[j][1] for j in moved]
    for job_id in moved:
        assert job(r, keys.job(job_id))["engine"] == "temporal"
        assert not r.hexists(MSGS_KEY, ids[job_id][0])
    assert not r.exists(DELAY_KEY, DELAY_MSGS_KEY)
    stay = ["temporal", "stale", "cancelling", "done", "unknown"]
    assert r.lrange(QUEUE_KEY, 0, -1) == [ids[j][0] for j in stay] + ["no-data"]
    assert all(r.hget(MSGS_KEY, ids[j][0]) == ids[j][1] for j in stay)
    assert job(r, keys.job("stale"))["engine"] == "dramatiq"
    assert not r.exists(keys.job("unknown"))


def test_rescue_looks_at_no_more_than_the_limit(r: redis.Redis, lua: Lua) -> None:
    rmids = []
    for n in range(3):
        rmid, _ = put_message(r, QUEUE_KEY, MSGS_KEY, job_id=f"j{n}")
        seed(r, keys.job(f"j{n}"), rmid=rmid)
        rmids.append(rmid)
    assert rescue(lua, limit=2) == 2
    assert r.lrange(QUEUE_KEY, 0, -1) == [rmids[2]]
    assert rescue(lua, limit=2) == 1
    assert r.llen(keys.handoff()) == 3


# heartbeat: KEYS dramatiq heartbeats, workers zset per queue...   ARGV worker id, broker id


def test_heartbeat_stamps_the_broker_and_every_queue(r: redis.Redis, lua: Lua) -> None:
    other = keys.workers("other")
    before = now_ms(r)
    now = lua("heartbeat", [keys.dramatiq_heartbeats(), WORKERS_KEY, other], WORKER, BROKER)
    assert_now(now, before, now_ms(r))
    assert r.zrange(keys.dramatiq_heartbeats(), 0, -1, withscores=True) == [(BROKER, now)]
    assert r.zrange(WORKERS_KEY, 0, -1, withscores=True) == [(WORKER, now)]
    assert r.zrange(other, 0, -1, withscores=True) == [(WORKER, now)]
    assert r.ttl(WORKERS_KEY) == -1


# deregister: KEYS workers zset per queue...   ARGV worker id


def test_deregister_removes_only_this_worker(r: redis.Redis, lua: Lua) -> None:
    other = keys.workers("other")
    for key in (WORKERS_KEY, other):
        r.zadd(key, {WORKER: 1, "worker-2": 2})
    assert lua("deregister", [WORKERS_KEY, other], WORKER) == "ok"
    assert r.zrange(WORKERS_KEY, 0, -1) == ["worker-2"] and r.zrange(other, 0, -1) == ["worker-2"]


# live_workers: KEYS workers zset   ARGV heartbeat timeout ms


def test_live_workers_counts_and_forgets_long_dead_ones(r: redis.Redis, lua: Lua) -> None:
    live_worker(r, "live")
    live_worker(r, "late", age_ms=TIMEOUT_MS + 1000)  # dead, but not for ten timeouts
    live_worker(r, "gone", age_ms=10 * TIMEOUT_MS + 1000)
    assert lua("live_workers", [WORKERS_KEY], TIMEOUT_MS) == 1
    assert sorted(r.zrange(WORKERS_KEY, 0, -1)) == ["late", "live"]
    assert lua("live_workers", [keys.workers("nobody")], TIMEOUT_MS) == 0


# lease: KEYS lease   ARGV holder, ms


def test_lease_is_taken_extended_and_refused_to_others(r: redis.Redis, lua: Lua) -> None:
    lease = keys.job_log_shipper()
    assert lua("lease", [lease], "a", 5000) == 1
    assert r.get(lease) == "a" and 0 < r.pttl(lease) <= 5000
    assert lua("lease", [lease], "a", 60000) == 1  # the holder extends it
    assert 5000 < r.pttl(lease) <= 60000
    assert lua("lease", [lease], "b", 5000) == 0
    assert r.get(lease) == "a" and r.pttl(lease) > 5000
    r.delete(lease)  # expired
    assert lua("lease", [lease], "b", 5000) == 1
    assert r.get(lease) == "b"


def test_reseal_writes_only_fields_that_still_hold_what_was_read(r: redis.Redis, lua: Lua) -> None:
    """`jobyard keys rotate` (jobyard.queue.rotation): a field a worker changed or deleted since
    it was read is left as it is; the hash keeps its TTL."""
    seed(r, result="old-r", error="old-e", progress="changed-since")
    r.expire(JOB_KEY, 600)
    read = ["result", "old-r", "new-r", "progress", "old-p", "new-p", "payload", "gone", "new"]
    assert lua("reseal", [JOB_KEY], *read) == 1
    record = job(r)
    assert (record["result"], record["progress"], record["error"]) == (
        "new-r", "changed-since", "old-e",
    )  # fmt: skip
    assert "payload" not in record and 590 < r.ttl(JOB_KEY) <= 600


def test_an_unknown_command_is_an_error(lua: Lua) -> None:
    with pytest.raises(redis.ResponseError, match=r"jobyard\.lua: unknown command nope"):
        lua("nope", [])


def test_every_command_has_a_test() -> None:
    commands = {line.split('"')[1] for line in SCRIPT.splitlines() if 'command == "' in line}
    assert len(commands) >= 16
    untested = {c for c in commands if not any(n.startswith(f"test_{c}_") for n in globals())}
    assert untested == set()


# start of a suspect (see jobyard.queue.reclaim): ARGV ..., the job's attempts


def test_start_of_a_suspect_records_its_run_alone(r: redis.Redis, lua: Lua) -> None:
    seed(r, state="running", attempts=1, started_seq=0, started_at=1000)
    keys_ = [JOB_KEY, STEPS_KEY, keys.lost_writes_before()]
    assert lua("start", keys_, 0, "0", 3)[:3] == ["ok", 2, "1000"]
    record = job(r)
    assert (record["lone"], record["lone_attempts"], record["attempts"]) == ("0", "3", "2")
    # Died alone with attempts left: it runs again, alone.
    assert lua("start", keys_, 0, "0", 3)[:3] == ["ok", 3, "1000"]


def test_start_of_a_suspect_whose_run_alone_used_the_last_attempt_is_exhausted(
    r: redis.Redis, lua: Lua
) -> None:
    seed(r, state="running", attempts=3, started_seq=0, started_at=1000, lone=0, died="how")
    keys_ = [JOB_KEY, STEPS_KEY, keys.lost_writes_before()]
    assert lua("start", keys_, 0, "0", 3) == ["exhausted", 3, "how"]
    assert job(r)["attempts"] == "3"  # nothing written: the caller finishes it dead
    # A death shared with other runs (no "lone" of this seq) gets its run alone first.
    seed(r, state="running", attempts=3, started_seq=0, lone=-1)
    assert lua("start", keys_, 0, "0", 3)[:2] == ["ok", 4]
    # Not a suspect: started as before, whatever its attempts.
    seed(r, state="running", attempts=5, started_seq=0, lone=0)
    assert start(lua)[:2] == ["ok", 6]


# reclaim: KEYS dramatiq heartbeats, queue list, queue msgs, delay list, delay msgs, suspects
#          ARGV acks prefix, queue, delay queue, job prefix, dead before ms, how those died,
#               (broker, how it died)...


def reclaim(lua: Lua, dead_before: int = 0, *named: str) -> Any:
    return lua(
        "reclaim",
        [keys.dramatiq_heartbeats(), *QUEUE_KEYS, keys.suspects(QUEUE)],
        keys.dramatiq_acks_prefix(),
        QUEUE,
        DELAY_QUEUE,
        keys.job_prefix(),
        dead_before,
        "stopped beating",
        *named,
    )


def held(r: redis.Redis, job_id: str, broker: str = BROKER, **fields: Any) -> str:
    """A message of `job_id` fetched by `broker` and not acked; the job's record with `fields`."""
    rmid, _ = put_message(r, QUEUE_KEY, MSGS_KEY, job_id=job_id)
    r.lrem(QUEUE_KEY, 0, rmid)
    r.sadd(keys.dramatiq_acks(broker, QUEUE), rmid)
    if fields.get("engine") != "none":
        seed(r, keys.job(job_id), rmid=rmid, **fields)
    return rmid


def test_reclaim_takes_a_named_dead_brokers_running_jobs_as_suspects(
    r: redis.Redis, lua: Lua
) -> None:
    ids = {
        "running": held(r, "running", state="running", started_seq=0),
        "marked": held(r, "marked", state="running"),  # a run without steps, shown running
        "fetched": held(r, "fetched"),  # fetched, never started
        "twice": held(r, "twice", deaths=1),  # its second dying process
        "stale": held(r, "stale", seq=3, state="running", started_seq=3),
        "done": held(r, "done", state="succeeded"),
        "cancelling": held(r, "cancelling", state="running", started_seq=0, cancel="1"),
    }
    delayed, _ = put_message(r, DELAY_KEY, DELAY_MSGS_KEY, job_id="parked")
    r.lrem(DELAY_KEY, 0, delayed)
    r.sadd(keys.dramatiq_acks(BROKER, DELAY_QUEUE), delayed)
    r.zadd(keys.dramatiq_heartbeats(), {BROKER: now_ms(r)})  # beating until it died
    held(r, "elsewhere", broker="broker-2", state="running", started_seq=0)

    assert reclaim(lua, 0, BROKER, "exited with exit code 1") == 3
    suspects = ["running", "marked", "twice"]
    assert sorted(r.lrange(keys.suspects(QUEUE), 0, -1)) == sorted(ids[j] for j in suspects)
    for job_id in suspects:
        assert job(r, keys.job(job_id))["died"] == "exited with exit code 1"
    requeued = ["fetched", "stale", "done", "cancelling"]
    assert sorted(r.lrange(QUEUE_KEY, 0, -1)) == sorted(ids[j] for j in requeued)
    assert "died" not in job(r, keys.job("fetched"))
    assert job(r, keys.job("fetched"))["deaths"] == "1"
    assert r.lrange(DELAY_KEY, 0, -1) == [delayed]
    assert not r.exists(ACKS_KEY, keys.dramatiq_acks(BROKER, DELAY_QUEUE))
    assert r.zscore(keys.dramatiq_heartbeats(), BROKER) is None  # forgotten
    assert r.scard(keys.dramatiq_acks("broker-2", QUEUE)) == 1  # a live broker's: untouched


def test_reclaim_by_heartbeat_takes_only_brokers_older_than_the_bound(
    r: redis.Redis, lua: Lua
) -> None:
    now = now_ms(r)
    r.zadd(keys.dramatiq_heartbeats(), {"host:1:ab/default": now - 10_000, "live": now})
    old = held(r, "old", broker="host:1:ab/default", state="running", started_seq=0)
    held(r, "live", broker="live", state="running", started_seq=0)
    assert reclaim(lua, now - 5_000) == 1
    assert r.lrange(keys.suspects(QUEUE), 0, -1) == [old]
    assert job(r, keys.job("old"))["died"] == "worker host:1:ab stopped beating"
    # Dramatiq's maintenance forgets the broker (it runs after): the heartbeat stays here.
    assert r.zscore(keys.dramatiq_heartbeats(), "host:1:ab/default") is not None
    assert r.scard(keys.dramatiq_acks("live", QUEUE)) == 1


# requeue_suspects: KEYS suspects, queue list, queue msgs   ARGV (message id, data)...


def test_requeue_suspects_puts_the_marked_messages_back_or_drops_them(
    r: redis.Redis, lua: Lua
) -> None:
    suspects_key = keys.suspects(QUEUE)
    kept, _ = put_message(r, QUEUE_KEY, MSGS_KEY, job_id="kept")
    dropped, _ = put_message(r, QUEUE_KEY, MSGS_KEY, job_id="dropped")
    r.delete(QUEUE_KEY)
    r.rpush(suspects_key, kept, dropped, "gone")
    reply = lua(
        "requeue_suspects", [suspects_key, QUEUE_KEY, MSGS_KEY],
        kept, "marked", dropped, "", "gone", "marked", "not-listed", "marked",
    )  # fmt: skip
    assert reply == 1
    assert r.lrange(QUEUE_KEY, 0, -1) == [kept]
    assert r.hget(MSGS_KEY, kept) == "marked"
    assert not r.hexists(MSGS_KEY, dropped) and not r.hexists(MSGS_KEY, "gone")
    assert not r.hexists(MSGS_KEY, "not-listed")
    assert not r.exists(suspects_key)


# --- Priorities (docs/flow-control.md "Priorities") -----------------------------------------
# A job's priority is its record's "priority"; p != 0 waits in jobyard:band:<queue>:<p>, listed
# in jobyard:bands:<queue> (score -p); priority 0 is Dramatiq's queue list, untouched.

BANDS_KEY = keys.bands(QUEUE)
BAND_PREFIX = keys.band_prefix(QUEUE)
CHANNEL = keys.priority_channel(QUEUE)


def enqueue_prioritized(
    lua: Lua, job_id: str, priority: int, *, queue_key: str = QUEUE_KEY, delayed: bool = False
) -> Any:
    """`enqueue` as store.enqueue calls it with a priority (p != 0)."""
    message = encode_job_message(NAME, QUEUE, job_id, {"job": job_id})
    return lua(
        "enqueue",
        [keys.job(job_id), WORKERS_KEY, queue_key, MSGS_KEY, BANDS_KEY],
        job_id,
        message.redis_message_id,
        message.data.decode(),
        NAME,
        QUEUE,
        TIMEOUT_MS,
        TTL,
        "",
        0,
        priority,
        "" if delayed else BAND_PREFIX,
        CHANNEL,
    )


def fetch(lua: Lua, wanted: int, broker: str = BROKER) -> list[str]:
    """`fetch` as BandCommands.fetch calls it: the job ids of the messages, in order."""
    data = lua(
        "fetch",
        [
            keys.dramatiq_heartbeats(),
            keys.dramatiq_acks(broker, QUEUE),
            QUEUE_KEY,
            MSGS_KEY,
            BANDS_KEY,
        ],
        broker,
        12345,
        wanted,
        BAND_PREFIX,
    )
    return [json.loads(d)["args"][0] for d in data]


def enqueue_plain(lua: Lua, job_id: str) -> Any:
    message = encode_job_message(NAME, QUEUE, job_id, {"job": job_id})
    return lua(
        "enqueue",
        [keys.job(job_id), WORKERS_KEY, QUEUE_KEY, MSGS_KEY],
        job_id,
        message.redis_message_id,
        message.data.decode(),
        NAME,
        QUEUE,
        TIMEOUT_MS,
        TTL,
        "",
    )


def test_enqueue_with_a_priority_puts_the_message_in_its_band_and_publishes_above_zero(
    r: redis.Redis, lua: Lua
) -> None:
    live_worker(r)
    listener = r.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(CHANNEL)
    listener.get_message(timeout=1)
    assert enqueue_prioritized(lua, "high", 7) == ["enqueued"]
    assert enqueue_prioritized(lua, "low", -3) == ["enqueued"]
    assert r.llen(QUEUE_KEY) == 0
    assert r.llen(keys.band(QUEUE, 7)) == 1 and r.llen(keys.band(QUEUE, -3)) == 1
    assert r.zrange(BANDS_KEY, 0, -1, withscores=True) == [("7", -7.0), ("-3", 3.0)]
    assert r.hget(keys.job("high"), "priority") == "7"
    published = listener.get_message(timeout=1)
    assert published is not None and published["data"] == "7"
    assert listener.get_message(timeout=0.2) is None  # nothing for p < 0
    listener.close()


def test_enqueue_with_a_priority_and_a_delay_waits_on_the_delay_queue(
    r: redis.Redis, lua: Lua
) -> None:
    live_worker(r)
    assert enqueue_prioritized(lua, "later", 5, queue_key=DELAY_KEY, delayed=True) == ["enqueued"]
    assert r.llen(DELAY_KEY) == 1 and r.exists(BANDS_KEY) == 0
    assert r.hget(keys.job("later"), "priority") == "5"  # its band once due (hand_back)


def test_enqueue_without_a_priority_touches_no_band_key(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    assert enqueue_plain(lua, "plain") == ["enqueued"]
    assert r.lrange(QUEUE_KEY, 0, -1) and r.exists(BANDS_KEY) == 0
    assert "priority" not in r.hgetall(keys.job("plain"))


# fetch: KEYS heartbeats, acks, queue list, queue msgs, bands   ARGV broker, ms, wanted, prefix


def test_fetch_takes_bands_above_zero_then_the_list_then_bands_below_in_fifo_order(
    r: redis.Redis, lua: Lua
) -> None:
    live_worker(r)
    for job_id, p in [("a0", 0), ("b-5", -5), ("c10", 10), ("d0", 0), ("e10", 10), ("f3", 3)]:
        if p:
            enqueue_prioritized(lua, job_id, p)
        else:
            enqueue_plain(lua, job_id)
    enqueue_prioritized(lua, "g-1", -1)
    assert fetch(lua, 3) == ["c10", "e10", "f3"]
    # Band 10 came up short: it left the index; band 3 gave exactly what was asked: it leaves
    # at the next fetch, which finds it empty.
    assert r.zrange(BANDS_KEY, 0, -1) == ["3", "-1", "-5"]
    assert fetch(lua, 10) == ["a0", "d0", "g-1", "b-5"]
    assert r.exists(BANDS_KEY) == 0
    assert len(r.smembers(ACKS_KEY)) == 7  # every id fetched is held, as Dramatiq's fetch
    assert r.zscore(keys.dramatiq_heartbeats(), BROKER) == 12345
    assert fetch(lua, 5) == []


def test_fetch_drops_a_message_whose_data_is_gone(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    enqueue_prioritized(lua, "gone", 4)
    enqueue_prioritized(lua, "kept", 4)
    rmid = r.lindex(keys.band(QUEUE, 4), 0)
    r.hdel(MSGS_KEY, rmid)  # cancelled while waiting
    assert fetch(lua, 5) == ["kept"]
    assert rmid not in r.smembers(ACKS_KEY)


# requeue: KEYS acks, queue list, queue msgs, bands   ARGV job prefix, band prefix, first|last, ids


def requeue(lua: Lua, ids: list[str], where: str = "last") -> Any:
    return lua(
        "requeue",
        [ACKS_KEY, QUEUE_KEY, MSGS_KEY, BANDS_KEY],
        keys.job_prefix(),
        BAND_PREFIX,
        where,
        *ids,
    )


def test_requeue_puts_each_message_back_in_its_band_first(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    for job_id in ("p1", "p2", "p3"):
        enqueue_prioritized(lua, job_id, 9)
    enqueue_plain(lua, "z1")
    enqueue_plain(lua, "z2")
    assert fetch(lua, 1) == ["p1"]
    taken = r.smembers(ACKS_KEY)
    assert fetch(lua, 2) == ["p2", "p3"]
    ids = [i for i in r.smembers(ACKS_KEY) if i not in taken]
    order = {json.loads(r.hget(MSGS_KEY, i))["args"][0]: i for i in ids}
    assert requeue(lua, [order["p2"], order["p3"]]) == 2
    # Back at the front of band 9, in their order, and the band is listed again.
    assert r.zrange(BANDS_KEY, 0, -1) == ["9"]
    assert fetch(lua, 10) == ["p2", "p3", "z1", "z2"]


def test_requeue_first_restores_priority_zero_order_too(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    for job_id in ("z1", "z2", "z3"):
        enqueue_plain(lua, job_id)
    fetched_ids = r.lrange(QUEUE_KEY, 0, 1)
    assert fetch(lua, 2) == ["z1", "z2"]
    assert requeue(lua, fetched_ids, "first") == 2
    assert fetch(lua, 10) == ["z1", "z2", "z3"]
    # "last" is Dramatiq's requeue: priority 0 at the back.
    all_ids = r.smembers(ACKS_KEY)
    first = [i for i in all_ids if json.loads(r.hget(MSGS_KEY, i))["args"][0] == "z1"]
    assert requeue(lua, first) == 1
    assert requeue(lua, first) == 0  # no longer held: nothing
    assert r.llen(QUEUE_KEY) == 1


# hand_back: KEYS queue list, queue msgs, bands   ARGV job prefix, band prefix, channel, id, data


def test_hand_back_puts_a_due_message_in_its_jobs_band(r: redis.Redis, lua: Lua) -> None:
    seed(r, keys.job("urgent"), priority=50)
    seed(r, keys.job("plain"))
    for job_id in ("urgent", "plain"):
        message = encode_job_message(NAME, QUEUE, job_id, {})
        p = lua(
            "hand_back",
            [QUEUE_KEY, MSGS_KEY, BANDS_KEY],
            keys.job_prefix(),
            BAND_PREFIX,
            CHANNEL,
            message.redis_message_id,
            message.data.decode(),
        )
        assert p == (50 if job_id == "urgent" else 0)
    assert r.llen(keys.band(QUEUE, 50)) == 1 and r.llen(QUEUE_KEY) == 1
    assert fetch(lua, 5) == ["urgent", "plain"]


def test_reclaim_with_band_keys_requeues_a_dead_brokers_message_to_its_band(
    r: redis.Redis, lua: Lua
) -> None:
    live_worker(r)
    enqueue_plain(lua, "z")
    enqueue_prioritized(lua, "hi", 20)
    assert fetch(lua, 5, broker="dead") == ["hi", "z"]
    reply = lua(
        "reclaim",
        [
            keys.dramatiq_heartbeats(),
            *QUEUE_KEYS,
            keys.suspects(QUEUE),
            BANDS_KEY,
            BAND_PREFIX,
        ],
        keys.dramatiq_acks_prefix(),
        QUEUE,
        DELAY_QUEUE,
        keys.job_prefix(),
        0,
        "stopped beating",
        "dead",
        "was killed",
    )
    assert reply == 0  # neither had started: no suspect
    assert r.llen(keys.band(QUEUE, 20)) == 1 and r.llen(QUEUE_KEY) == 1
    assert fetch(lua, 5) == ["hi", "z"]


def test_requeue_suspects_with_band_keys_puts_a_suspect_in_its_band(
    r: redis.Redis, lua: Lua
) -> None:
    seed(r, keys.job("hi"), priority=-20)
    message = encode_job_message(NAME, QUEUE, "hi", {})
    r.hset(MSGS_KEY, message.redis_message_id, message.data.decode())
    r.rpush(keys.suspects(QUEUE), message.redis_message_id)
    reply = lua(
        "requeue_suspects",
        [keys.suspects(QUEUE), QUEUE_KEY, MSGS_KEY, BANDS_KEY, BAND_PREFIX, keys.job_prefix()],
        message.redis_message_id,
        message.data.decode(),
    )
    assert reply == 1
    assert r.lrange(keys.band(QUEUE, -20), 0, -1) == [message.redis_message_id]
    assert r.llen(QUEUE_KEY) == 0


def test_rescue_with_band_keys_moves_banded_jobs_highest_first(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    enqueue_plain(lua, "z")
    enqueue_prioritized(lua, "hi", 30)
    r.delete(WORKERS_KEY)  # the workers died
    moved = lua(
        "rescue",
        [WORKERS_KEY, *QUEUE_KEYS, keys.handoff(), BANDS_KEY],
        TIMEOUT_MS,
        100,
        keys.job_prefix(),
        BAND_PREFIX,
    )
    assert moved == 2
    handed = [json.loads(d)["args"][0] for d in r.lrange(keys.handoff(), 0, -1)]
    assert handed == ["hi", "z"]


# Flow control's parked set (docs/flow-control.md): a job a limit holds waits in
# jobyard:parked:<queue> (score: when it asks again), its record showing why.
PARKED_KEY = keys.parked(QUEUE)


def enqueue_parked(lua: Lua, job_id: str, until_ms: int, priority: int = 0) -> Any:
    """`enqueue` as store.enqueue calls it for a job a limit held at dispatch."""
    message = encode_job_message(NAME, QUEUE, job_id, {"job": job_id})
    return lua(
        "enqueue",
        [keys.job(job_id), WORKERS_KEY, QUEUE_KEY, MSGS_KEY, BANDS_KEY, PARKED_KEY],
        job_id, message.redis_message_id, message.data.decode(), NAME, QUEUE, TIMEOUT_MS, TTL,
        "", 0, priority, BAND_PREFIX, CHANNEL, until_ms, "waiting for slot", "limit x",
    )  # fmt: skip


def fetch_with_parked(lua: Lua, wanted: int) -> list[str]:
    data = lua(
        "fetch",
        [
            keys.dramatiq_heartbeats(), ACKS_KEY, QUEUE_KEY, MSGS_KEY, BANDS_KEY, PARKED_KEY,
            CHANNEL,
        ],
        BROKER, 12345, wanted, BAND_PREFIX, keys.job_prefix(),
    )  # fmt: skip
    return [json.loads(d)["args"][0] for d in data]


def test_enqueue_held_by_a_limit_parks_the_message_and_shows_why(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    later = now_ms(r) + 60_000
    assert enqueue_parked(lua, "held", later) == ["enqueued"]
    assert r.llen(QUEUE_KEY) == 0 and r.zcard(PARKED_KEY) == 1
    record = job(r, keys.job("held"))
    assert (record["hold_state"], record["hold_reason"]) == ("waiting for slot", "limit x")
    assert record["run_at"] == str(later) and record["state"] == "queued"
    assert fetch_with_parked(lua, 5) == []  # not due: it stays parked


def test_fetch_moves_due_parked_messages_to_their_lists_first(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    enqueue_plain(lua, "ready")
    enqueue_parked(lua, "due", now_ms(r) - 1)
    enqueue_parked(lua, "due-high", now_ms(r) - 1, priority=5)
    enqueue_parked(lua, "later", now_ms(r) + 60_000)
    assert fetch_with_parked(lua, 10) == ["due-high", "ready", "due"]
    assert r.zcard(PARKED_KEY) == 1


def test_wake_moves_a_parked_job_to_its_list_now(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    enqueue_parked(lua, "slept", now_ms(r) + 60_000)
    keys_ = [PARKED_KEY, QUEUE_KEY, MSGS_KEY, BANDS_KEY, CHANNEL]
    # "unknown" has no Dramatiq record: a waiter to wake on Temporal
    assert lua("wake", keys_, keys.job_prefix(), BAND_PREFIX, "slept", "unknown") == [1, "unknown"]
    assert r.zcard(PARKED_KEY) == 0 and r.llen(QUEUE_KEY) == 1
    assert lua("wake", keys_, keys.job_prefix(), BAND_PREFIX, "slept") == [0]  # not parked now
    assert fetch_with_parked(lua, 5) == ["slept"]


def test_reschedule_with_a_hold_parks_the_next_message(r: redis.Redis, lua: Lua) -> None:
    seed(r, rmid="m1")
    r.sadd(ACKS_KEY, "m1")
    r.hset(MSGS_KEY, "m1", "{}")
    at = now_ms(r) + 5000
    reply = lua(
        "reschedule", [JOB_KEY, PARKED_KEY, MSGS_KEY, ACKS_KEY, MSGS_KEY],
        0, 1, "queued", "m2", "data", "", "", "m1", at, "throttled", "rate limit y",
    )  # fmt: skip
    assert reply == "ok"
    assert r.zscore(PARKED_KEY, "m2") == at and r.hget(MSGS_KEY, "m2") == "data"
    assert r.llen(DELAY_KEY) == 0 and not r.sismember(ACKS_KEY, "m1")
    record = job(r)
    assert (record["hold_state"], record["hold_reason"], record["seq"]) == (
        "throttled", "rate limit y", "1"
    )  # fmt: skip


def test_rescue_with_the_parked_key_moves_parked_jobs_too(r: redis.Redis, lua: Lua) -> None:
    live_worker(r)
    enqueue_parked(lua, "held", now_ms(r) + 60_000)
    r.delete(WORKERS_KEY)
    moved = lua(
        "rescue", [WORKERS_KEY, *QUEUE_KEYS, keys.handoff(), BANDS_KEY, PARKED_KEY],
        TIMEOUT_MS, 100, keys.job_prefix(), BAND_PREFIX,
    )  # fmt: skip
    assert moved == 1 and r.zcard(PARKED_KEY) == 0
    assert r.hget(keys.job("held"), "engine") == "temporal"

"""`jobyard keys rotate`, Redis's side (jobyard.queue.rotation): a delayed job's message, a job
record and a step record sealed with k1 are sealed again with k2 in place (their other fields,
their TTL and their plaintext as they were), so they read back with k2 alone; a value a worker
changed since it was read is not overwritten; what cannot be rewritten (the job log's outbox,
the handoff list) or read (a key the ring lacks) is counted, and the command says so (exit 3)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobyard.cli.keys import EXIT_OLD_KEY_IN_USE
from jobyard.cli.main import build_parser, run_command
from jobyard.job_engine import crypto, env
from jobyard.job_engine.db.migrate import upgrade
from jobyard.queue import keys
from jobyard.queue.messages import decode_job_message, encode_job_message
from jobyard.queue.rotation import RedisRotation
from tests.support import RedisServer

K1, K2, K9 = (f"{name}:{crypto.new_key()}" for name in ("k1", "k2", "k9"))
JOB = "rot-redis-1"
TIMING = '{"started":1.0,"ended":2.0}'


def use(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv(env.ENCRYPTION_KEYS, setting)
    crypto.reset()


@pytest.fixture
def client(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.setenv(env.REDIS_URL, redis_server.url)
    connection = redis_server.client()
    yield connection
    connection.close()
    monkeypatch.delenv(env.ENCRYPTION_KEYS)
    crypto.reset()


def write_job(client: redis.Redis) -> str:
    """What Redis holds of a job delayed after its first step and a failed run: its message
    on the delay queue, its record, its step record; returns the message's id."""
    message = encode_job_message("test.canary", "default", JOB, {"secret": JOB}, delay_seconds=600)
    client.hset(keys.dramatiq_messages(message.queue), message.redis_message_id, message.data)
    client.hset(keys.job(JOB), mapping={
        "name": "test.canary", "state": "retrying",
        "progress": crypto.seal_json(JOB, json.dumps({"done": 1})),
        "error": crypto.seal(JOB, f"ValueError: {JOB}"),
    })  # fmt: skip
    client.expire(keys.job(JOB), 3600)
    client.hset(keys.steps(JOB), mapping={
        "s0": crypto.seal_json(JOB, json.dumps({"step saw": JOB})), "__timing__:s0": TIMING,
    })  # fmt: skip
    return message.redis_message_id


def read_job(client: redis.Redis, message_id: str) -> None:
    """Every value of write_job reads back, with whatever ring is set now."""
    data = client.hget(keys.dramatiq_messages(keys.delayed("default")), message_id)
    decoded = decode_job_message(data)
    assert (decoded.job_id, decoded.payload, decoded.eta is not None) == (
        JOB,
        {"secret": JOB},
        True,
    )
    record = {k.decode(): v.decode() for k, v in client.hgetall(keys.job(JOB)).items()}
    assert crypto.unseal(JOB, json.loads(record["progress"])) == {"done": 1}
    assert crypto.unseal(JOB, record["error"]) == f"ValueError: {JOB}"
    assert (record["name"], record["state"]) == ("test.canary", "retrying")
    steps = client.hgetall(keys.steps(JOB))
    assert json.loads(crypto.unseal_json(JOB, steps[b"s0"].decode())) == {"step saw": JOB}
    assert steps[b"__timing__:s0"].decode() == TIMING


def test_waiting_jobs_values_move_to_the_new_key_in_place(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, K1)
    message_id = write_job(client)
    use(monkeypatch, f"{K2},{K1}")
    rotation = RedisRotation(client)
    assert rotation.old_key_holders().records == 4  # message, progress, error, step
    passes = []
    assert rotation.rotate(on_pass=passes.append) == 4
    assert [(p.rewritten, p.changed_meanwhile) for p in passes] == [(4, 0), (0, 0)]
    assert rotation.old_key_holders().total == 0
    assert 3500 < client.ttl(keys.job(JOB)) <= 3600  # the record's retention kept

    use(monkeypatch, K2)  # the old key removed: everything reads
    read_job(client, message_id)


def test_a_value_changed_after_it_was_read_is_not_overwritten(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, K1)
    write_job(client)
    use(monkeypatch, f"{K2},{K1}")
    rotation = RedisRotation(client)
    read = client.hget(keys.steps(JOB), "s0")
    written_since = crypto.seal_json(JOB, json.dumps({"step saw": "a worker"}))
    client.hset(keys.steps(JOB), "s0", written_since)  # a worker wrote it meanwhile
    assert rotation._call([keys.steps(JOB)], "reseal", "s0", read, "resealed") == 0
    assert client.hget(keys.steps(JOB), "s0").decode() == written_since


def test_what_cannot_be_rewritten_or_read_is_counted_and_the_command_says_so(
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    upgrade(url)
    use(monkeypatch, K9)  # another deployment's key, never in this ring
    client.hset(keys.job("foreign"), "result", json.dumps(crypto.seal("foreign", 1)))
    use(monkeypatch, K1)
    message = encode_job_message("test.canary", "default", JOB, {"secret": JOB})
    client.rpush(keys.handoff(), message.data)  # moving to Temporal
    client.xadd(
        keys.job_log_events(), {"job": keys.job(JOB), "progress": crypto.seal_json(JOB, "1")}
    )

    use(monkeypatch, f"{K2},{K1}")
    args = ["keys", "rotate", "--url", url, "--outbox-wait", "0"]
    assert run_command(build_parser().parse_args(args)) == EXIT_OLD_KEY_IN_USE
    out, err = capsys.readouterr()
    first, last = json.loads(out.splitlines()[0]), json.loads(out.splitlines()[-1])
    assert first["unreadable"] == 1  # the foreign value: left as it is, no crash
    assert last["left_on_old_keys"] == {"redis": 1, "job_log_outbox": 1, "handoff": 1}
    assert "still need key(s) k1, k9" in err

    client.delete(keys.handoff(), keys.job_log_events(), keys.job("foreign"))  # consumed
    assert run_command(build_parser().parse_args(args)) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["left_on_old_keys"] == {
        "redis": 0, "job_log_outbox": 0, "handoff": 0,
    }  # fmt: skip


def test_a_delayed_message_a_worker_fetched_before_the_rotation_comes_due_on_the_new_key(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dramatiq's consumer holds fetched delayed messages in memory until they are due, then
    enqueues its copy: fetched before `jobyard keys rotate`, due after it, that copy must not
    bring k1 back into Redis (the rotation row lost 7 of 2,000 jobs so, k1 removed)."""
    from jobyard.queue.dramatiq_compat import JobyardBroker

    use(monkeypatch, K1)
    message = encode_job_message("test.canary", "default", JOB, {"secret": JOB})
    use(monkeypatch, f"{K2},{K1}")
    broker = JobyardBroker(client=client, namespace=keys.DRAMATIQ_NAMESPACE)
    broker.do_enqueue("default", message.redis_message_id, message.data)
    stored = client.hget(keys.dramatiq_messages("default"), message.redis_message_id).decode()
    assert crypto.key_ids_within(stored) == {"k2"}
    before, after = json.loads(message.data), json.loads(stored)
    assert after["args"][1] != before["args"][1]
    after["args"][1] = before["args"][1]
    assert after == before  # the rest of the message as it was
    use(monkeypatch, K2)
    assert decode_job_message(stored.encode()).payload == {"secret": JOB}

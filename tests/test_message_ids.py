"""Job and message ids are drawn from a per-process pool (one read of the random source per
500): a forked child (a pre-forking web server's worker) must never hand out its parent's."""

from __future__ import annotations

import json
import os
import time

from jobyard.queue.messages import (
    NewJobMessages,
    encode_job_message,
    new_job_id,
    new_job_ids,
    random_id,
    random_ids,
)


def test_ids_look_like_token_hex_and_do_not_repeat() -> None:
    ids = [random_id() for _ in range(1200)] + random_ids(50)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_job_ids_made_later_sort_later_and_do_not_repeat() -> None:
    """Job ids lead with the time in ms (the job log's primary key then grows at its right
    edge), 80 random bits after it."""
    earlier = [new_job_id() for _ in range(600)] + new_job_ids(600)
    time.sleep(0.002)
    later = [*new_job_ids(3), new_job_id()]
    ids = earlier + later
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert max(earlier) < min(later)
    assert abs(int(later[-1][:12], 16) / 1000 - time.time()) < 5


def test_a_forked_child_draws_ids_of_its_own() -> None:
    random_id()  # the pool is full now, and would be copied into the child
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's side
        os.write(write_end, random_id().encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    from_child = os.read(read_end, 64).decode()
    os.close(read_end)
    assert from_child != random_id()


def test_messages_made_many_at_once_decode_as_encode_job_message_builds_them() -> None:
    """`NewJobMessages.encode_many` (dispatch_many's messages): each is the message
    `encode_job_message` would build for the job, with its own message id and one timestamp;
    a name with a % in it is no format directive."""
    payloads = [{"n": n, "to": "ünï@example.test", "deep": {"a": [1, None]}} for n in range(3)]
    texts = [json.dumps(p, separators=(",", ":"), ensure_ascii=False).encode() for p in payloads]
    job_ids = [f"job-{n}" for n in range(3)]
    message_ids, messages = NewJobMessages("100%s.job", "default").encode_many(job_ids, texts)
    assert len(set(message_ids)) == 3
    made_ones = zip(job_ids, payloads, message_ids, messages, strict=True)
    for job_id, payload, message_id, data in made_ones:
        made = json.loads(data)
        expected = json.loads(encode_job_message("100%s.job", "default", job_id, payload).data)
        assert made["message_id"] == made["options"]["redis_message_id"] == message_id.decode()
        for fields in (made, expected):
            del fields["message_id"], fields["options"]["redis_message_id"]
        assert abs(made.pop("message_timestamp") - expected.pop("message_timestamp")) < 1000
        assert made == expected

"""Building the Dramatiq messages that carry a job, for the dispatcher and for reschedules."""

from __future__ import annotations

import binascii
import json
import os
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from dramatiq import Message
from dramatiq.encoder import JSONEncoder
from dramatiq.message import get_encoder

from jobyard.job_engine import crypto, tracing

# Job ids are engine-neutral (jobyard.job_engine.ids); re-exported for code that imported them here.
from jobyard.job_engine.ids import IDS_AT_ONCE as IDS_AT_ONCE
from jobyard.job_engine.ids import new_job_id as new_job_id
from jobyard.job_engine.ids import new_job_ids as new_job_ids
from jobyard.job_engine.ids import random_id
from jobyard.job_engine.ids import random_ids as random_ids
from jobyard.queue import keys

SEQ = "jobyard_seq"  # which run of the job this message is (see seq in jobyard.lua)
RESUME = "jobyard_resume"  # True when the run continues an attempt (after a sleep or a throttle)
WEBHOOK = "jobyard_webhook"  # where to deliver the job's completion events, if anywhere
RETRY = "jobyard_retry"  # a per-dispatch override of the job's retry policy
AFTER = "jobyard_after"  # the jobs it runs after: {"ids", "on_failure"} (dispatch's after=)
TRACE = "jobyard_trace"  # the W3C trace context it was sent in, when tracing is on


class EncodedMessage(NamedTuple):  # a NamedTuple: made once per dispatch
    queue: str  # the Dramatiq queue it goes on: the job's queue or its delay queue
    redis_message_id: str
    data: bytes


def encode_job_message(
    job_name: str,
    queue: str,
    job_id: str,
    payload: Any,
    *,
    seq: int = 0,
    resume: bool = False,
    delay_seconds: float | None = None,
    webhook_url: str | None = None,
    retry: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    trace: dict[str, str] | None = None,
) -> EncodedMessage:
    """`trace`: the context of a dispatch made elsewhere (an outbox row's), else the current."""
    message_id = random_id()
    options: dict[str, Any] = {"redis_message_id": message_id, SEQ: seq, RESUME: resume}
    if webhook_url:
        options[WEBHOOK] = webhook_url
    if retry:
        options[RETRY] = retry
    if after:
        options[AFTER] = after
    if trace:
        options[TRACE] = trace
    elif tracing.ACTIVE:  # the dispatch's span, or the run's for a retry or a resumed sleep
        options[TRACE] = tracing.inject()
    target = queue
    if delay_seconds:
        target = keys.delayed(queue)
        options["eta"] = int((time.time() + delay_seconds) * 1000)
    fields = {  # dramatiq.Message's fields, in its order
        "queue_name": target,
        "actor_name": job_name,
        "args": (job_id, crypto.seal(job_id, payload)),
        "kwargs": {},
        "options": options,
        "message_id": message_id,
        "message_timestamp": int(time.time() * 1000),
    }
    return EncodedMessage(target, message_id, _encode(fields))


class NewJobMessages:
    """The first messages of jobs of one name dispatched with no options, built around each
    payload's JSON text from a template: for bulk dispatch, where encoding the message dict
    again costs more than everything else a job needs. Decodes to what `encode_job_message`
    builds (the payload's text is UTF-8 JSON, not ASCII-escaped)."""

    def __init__(self, job_name: str, queue: str) -> None:
        head = {"queue_name": queue, "actor_name": job_name}
        self._head = json.dumps(head, separators=(",", ":"))[:-1].encode() + b',"args":["'
        #: The whole message as one %-format: job id, payload, message id twice, timestamp.
        self._format = (
            self._head.replace(b"%", b"%%") + b'%s",%s'
            + _OPTIONS_HEAD + b"%s" + _OPTIONS_TAIL + b'%s","message_timestamp":%s}'
        )  # fmt: skip

    @staticmethod
    def usable() -> bool:
        """Whether the template gives what `encode_job_message` would: not with another
        encoder set in dramatiq, nor with tracing on (each message carries its trace)."""
        return type(get_encoder()) is JSONEncoder and not tracing.ACTIVE

    def encode(self, job_id: str, payload_json: bytes) -> tuple[str, bytes]:
        """(redis message id, message) for a new job; `job_id` needs no JSON escaping (the
        dispatcher's id pattern allows none of the characters that do)."""
        message_id = random_id()
        mid = message_id.encode()
        if crypto.RING is not None:
            payload_json = crypto.seal_json(job_id, payload_json.decode()).encode()
        return message_id, b"".join((
            self._head, job_id.encode(), b'",', payload_json, _OPTIONS_HEAD, mid, _OPTIONS_TAIL,
            mid, b'","message_timestamp":', str(int(time.time() * 1000)).encode(), b"}",
        ))  # fmt: skip

    def encode_many(
        self, job_ids: list[str], payload_jsons: list[bytes]
    ) -> tuple[list[bytes], list[bytes]]:
        """`encode` of many new jobs dispatched together: (their redis message ids, their
        messages), in order. One read of the random source for the ids, one timestamp."""
        text = binascii.hexlify(os.urandom(16 * len(job_ids)))
        message_ids = [text[at : at + 32] for at in range(0, len(text), 32)]
        stamp = str(int(time.time() * 1000)).encode()
        if crypto.RING is not None:
            payload_jsons = [
                crypto.seal_json(job_id, payload.decode()).encode()
                for job_id, payload in zip(job_ids, payload_jsons, strict=True)
            ]
        form = self._format
        messages = [
            form % (job_id.encode(), payload, mid, mid, stamp)
            for job_id, payload, mid in zip(job_ids, payload_jsons, message_ids, strict=True)
        ]
        return message_ids, messages


#: A new job's options (seq 0, not a resume) around its message id, as `json.dumps` writes them.
_OPTIONS_HEAD = b'],"kwargs":{},"options":{"redis_message_id":"'
_OPTIONS_TAIL = f'","{SEQ}":0,"{RESUME}":false}},"message_id":"'.encode()


def _encode(fields: dict[str, Any]) -> bytes:
    """What `Message(**fields).encode()` returns, without building the Message: on the dispatch
    path that costs more than the JSON itself. Another encoder set in dramatiq gets the Message."""
    encoder = get_encoder()
    if type(encoder) is JSONEncoder:
        return json.dumps(fields, separators=(",", ":")).encode("utf-8")
    return Message(**fields).encode()


@dataclass(frozen=True)
class DecodedJob:
    """What a job message carries, read back (the rescue hands it to Temporal)."""

    job_id: str
    name: str
    queue: str  # the job's queue, never its delay queue
    payload: Any
    webhook_url: str | None
    retry: dict[str, Any] | None
    eta: float | None  # unix seconds it may run at, for a delayed message
    trace: dict[str, str] | None = None  # the trace context it was sent in
    after: dict[str, Any] | None = None  # the jobs it runs after


def decode_job_message(data: bytes) -> DecodedJob:
    message: Message[Any] = Message.decode(data)
    job_id, payload = message.args
    return DecodedJob(
        job_id=job_id,
        name=message.actor_name,
        queue=message.queue_name.removesuffix(keys.DELAY_SUFFIX),
        payload=crypto.unseal(job_id, payload),
        webhook_url=message.options.get(WEBHOOK),
        retry=message.options.get(RETRY),
        eta=message.options["eta"] / 1000 if message.options.get("eta") else None,
        trace=message.options.get(TRACE),
        after=message.options.get(AFTER),
    )

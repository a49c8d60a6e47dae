"""`jobyard keys rotate`, Redis's side: the sealed values of jobs still in Redis (their Dramatiq
messages, queued, delayed or parked; their job records; their step records) sealed again with
the key ring's primary key, so that an older key can leave JOBYARD_ENCRYPTION_KEYS while jobs
dispatched before the rotation are still waiting or sleeping.

Safe beside running workers: each value is read, sealed again in this process, and written by
jobyard.lua's `reseal` only if the field still holds what was read. A worker that changed or
deleted it meanwhile (a job that ran, a message acked or moved from the delay queue to its
queue) wrote with the primary key already, or took the value elsewhere: the next pass finds it
there. A worker holding a value it read before (a message it fetched) still opens it with the
old key, which every process keeps until the rotation is over.

A worker that fetched a delayed message before the rotation holds it in memory until it comes
due, then writes it to its queue: `on_primary_key` seals it again on the way (the workers run
with the new key first by then), so that copy does not bring the old key back.

Two places are not rewritten, as their entries are consumed, not updated: the job log's outbox
stream (the shipper writes its entries to the database, where the database's rotation reaches
them; the command waits for those on an old key to be shipped) and the handoff list (messages
the rescue is moving to Temporal, gone within a rescue interval). `old_key_holders` counts what
still holds an old key anywhere here; the command reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dramatiq import Message

from jobyard.job_engine import crypto
from jobyard.queue import keys
from jobyard.queue.store.script import ScriptStore, _text

#: Fields per `reseal` call (and held in memory at once): a Dramatiq message may be as large as
#: a payload may.
FIELDS_PER_CALL = 100
#: Keys asked of SCAN, and fields of HSCAN, per round trip.
SCAN_COUNT = 500
#: Passes at most: a value moved during one (a delayed message handed to its queue) is found by
#: the next; passes stop at the first that found nothing left to write.
MAX_PASSES = 5


@dataclass
class RedisPass:
    number: int
    hashes: int = 0  # job records, step records and messages hashes read
    rewritten: int = 0  # fields written with the primary key
    changed_meanwhile: int = 0  # fields a worker changed or deleted between read and write
    #: fields left as they are: a key they need is not in the ring, or they do not decrypt
    #: (another deployment's data in the same Redis database); old_key_holders counts them
    unreadable: int = 0

    @property
    def done(self) -> bool:
        return self.rewritten == 0 and self.changed_meanwhile == 0


@dataclass
class OldKeyHolders:
    """Values in Redis sealed with a key other than the primary: each needs that key to be read."""

    records: int = 0  # fields of job records, step records and messages hashes
    outbox: int = 0  # entries of the job log's outbox stream, not shipped yet
    handoff: int = 0  # messages on the handoff list
    key_ids: frozenset[str] = frozenset()

    @property
    def total(self) -> int:
        return self.records + self.outbox + self.handoff


class RedisRotation(ScriptStore):
    def rotate(self, on_pass: Callable[[RedisPass], None] | None = None) -> int:
        """Passes until one finds nothing to write (at most MAX_PASSES); the fields written."""
        total = 0
        for number in range(1, MAX_PASSES + 1):
            done = self.one_pass(number)
            total += done.rewritten
            if on_pass is not None:
                on_pass(done)
            if done.done:
                break
        return total

    def one_pass(self, number: int = 1) -> RedisPass:
        ring = crypto.key_ring()
        if ring is None:
            return RedisPass(number)
        done = RedisPass(number)
        for hash_key, job_id_of in self._sealed_hashes():
            done.hashes += 1
            writes: list[tuple[bytes, bytes, str]] = []
            for field, value in self.client.hscan_iter(hash_key, count=SCAN_COUNT):
                text = _utf8(value)
                if text is None or not (crypto.key_ids_within(text) - {ring.primary}):
                    continue
                job_id = job_id_of(text)
                if job_id is None:
                    continue  # not a job's message: nothing of ours is sealed in it
                try:
                    new, count = crypto.reseal_within(job_id, text)
                except (crypto.MissingEncryptionKeyError, crypto.DecryptionError):
                    done.unreadable += 1
                    continue
                if count:
                    writes.append((field, value, new))
                if len(writes) == FIELDS_PER_CALL:  # a queue's hash holds every waiting message
                    self._reseal(hash_key, writes, done)
                    writes = []
            if writes:
                self._reseal(hash_key, writes, done)
        return done

    def _reseal(
        self, hash_key: str, writes: list[tuple[bytes, bytes, str]], done: RedisPass
    ) -> None:
        """(field, value read, value to write) of `hash_key`, each written if still as read."""
        written = int(self._call([hash_key], "reseal", *[x for w in writes for x in w]))
        done.rewritten += written
        done.changed_meanwhile += len(writes) - written

    def old_key_holders(self) -> OldKeyHolders:
        """What in Redis still holds a value sealed with a key other than the primary."""
        ring = crypto.key_ring()
        if ring is None:
            return OldKeyHolders()
        found: set[str] = set()
        counts = {"records": 0, "handoff": 0}
        for hash_key, _ in self._sealed_hashes():
            for _field, value in self.client.hscan_iter(hash_key, count=SCAN_COUNT):
                counts["records"] += _old(value, ring.primary, found)
        outbox = self.outbox_on_old_keys(found)
        for message in self._handoff_messages():
            counts["handoff"] += _old(message, ring.primary, found)
        return OldKeyHolders(**counts, outbox=outbox, key_ids=frozenset(found))

    def outbox_on_old_keys(self, found: set[str] | None = None) -> int:
        """Entries of the job log's outbox holding a value sealed with a key other than the
        primary (their ids are added to `found`)."""
        ring = crypto.key_ring()
        if ring is None:
            return 0
        found = set() if found is None else found
        return sum(
            any([_old(value, ring.primary, found) for value in fields.values()])
            for _entry_id, fields in self._outbox_entries()
        )

    def _sealed_hashes(self) -> Iterator[tuple[str, Callable[[str], str | None]]]:
        """(hash key, how to find the job id a value of it is sealed for) of every job record,
        step record and messages hash."""
        for prefix in (keys.job_prefix(), keys.steps_prefix()):
            for raw in self.client.scan_iter(match=f"{prefix}*", count=SCAN_COUNT, _type="hash"):
                key = _text(raw)
                job_id = key[len(prefix) :]
                yield key, lambda _text, job_id=job_id: job_id  # type: ignore[misc]
        pattern = keys.dramatiq_messages_pattern()
        for raw in self.client.scan_iter(match=pattern, count=SCAN_COUNT, _type="hash"):
            yield _text(raw), _message_job_id

    def _outbox_entries(self) -> Iterator[tuple[Any, dict[Any, Any]]]:
        after = "-"
        while True:
            entries: Any = self.client.xrange(keys.job_log_events(), min=after, count=SCAN_COUNT)
            if not entries:
                return
            yield from entries
            after = f"({_text(entries[-1][0])}"

    def _handoff_messages(self) -> Iterator[Any]:
        start = 0
        while True:
            chunk: Any = self.client.lrange(keys.handoff(), start, start + SCAN_COUNT - 1)
            if not chunk:
                return
            yield from chunk
            start += SCAN_COUNT


def on_primary_key(data: bytes) -> bytes:
    """A job's message a worker writes back to Redis from its memory (a delayed message come
    due, which Dramatiq's consumer fetched maybe long before) with its payload sealed with the
    primary key: fetched before a rotation, it would otherwise bring the old key back into Redis
    after `jobyard keys rotate` had moved every copy there off it. The message as it is with
    encryption off, and when it is on the primary key already."""
    ring = crypto.key_ring()
    if ring is None or crypto.MARKER.encode() not in data:
        return data
    text = _utf8(data)
    if text is None or not (crypto.key_ids_within(text) - {ring.primary}):
        return data
    job_id = _message_job_id(text)
    if job_id is None:
        return data
    return crypto.reseal_within(job_id, text)[0].encode()


def _old(value: Any, primary: str, found: set[str]) -> bool:
    """Whether `value` holds a sealed value on a key other than `primary` (added to `found`)."""
    text = _utf8(value)
    ids = crypto.key_ids_within(text) - {primary} if text is not None else set()
    found.update(ids)
    return bool(ids)


def _utf8(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return None  # not a JSON text: no sealed value of ours


def _message_job_id(text: str) -> str | None:
    """The job id a job's Dramatiq message carries (its first argument)."""
    try:
        args = Message.decode(text.encode()).args
    except Exception:  # dramatiq raises DecodeError, or the encoder's own errors
        return None
    return args[0] if args and isinstance(args[0], str) else None

"""Payloads, results, errors and progress encrypted where they rest (Redis, the job log, the
dispatch outbox), with AES-256-GCM and a key ring read from JOBYARD_ENCRYPTION_KEYS.

    JOBYARD_ENCRYPTION_KEYS="k2:<base64 of 32 bytes>,k1:<base64 of 32 bytes>"

The first key encrypts; every key decrypts, so a new key goes at the front and the old one stays
until `jobyard keys rotate` has re-encrypted the job log (and Redis's records have expired).
Unset (the default), nothing is encrypted and every `seal` is one check of a module global.

A sealed value is a JSON string, so every column and field that holds JSON holds it unchanged:

    "$jy1$<key id>$<base64url(nonce 12 bytes | ciphertext | tag 16 bytes)>"

The plaintext is the value's JSON text; the associated data binds it to its job id and key id,
so a ciphertext copied to another job does not decrypt. Values that are not sealed (written
before encryption was switched on, or None) read back as they are. Names, queues, states,
times and ids are never sealed: listings, graphs and the rescue work on them unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from jobyard.job_engine import env

MARKER = "$jy1$"
KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")
KEY_BYTES = 32
NONCE_BYTES = 12
#: A sealed value as JSON text starts with this (`seal_json` leaves such text as it is).
_JSON_MARKER = '"' + MARKER
#: A sealed value anywhere in a text (a Dramatiq message, a Redis record's field): its key id
#: and body. Neither holds a character JSON escapes, so it appears in JSON text as it is.
ENVELOPE = re.compile(re.escape(MARKER) + r"([A-Za-z0-9_.-]{1,32})\$([A-Za-z0-9_=-]*)")


class EncryptionConfigError(ValueError):
    """JOBYARD_ENCRYPTION_KEYS is malformed (the message says how, never a key's bytes)."""


class MissingEncryptionKeyError(RuntimeError):
    """A value was sealed with a key the ring does not hold any more (or not yet)."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"a value is encrypted with key {key_id!r}, which {env.ENCRYPTION_KEYS} does not "
            f"hold: add it back (after the key that encrypts) to read it"
        )
        self.key_id = key_id


class DecryptionError(ValueError):
    """A sealed value that does not decrypt: tampered with, truncated, or another job's."""


@dataclass(frozen=True)
class KeyRing:
    """Keys by id; `primary` encrypts."""

    primary: str
    ciphers: dict[str, AESGCM]

    def seal_text(self, job_id: str, plaintext: str) -> str:
        body = self.seal_bytes(plaintext.encode("utf-8"), _associated(self.primary, job_id))
        return f"{MARKER}{self.primary}${base64.urlsafe_b64encode(body).decode()}"

    def open_text(self, job_id: str, envelope: str) -> str:
        key_id, body = _parts(envelope)
        try:
            raw = base64.urlsafe_b64decode(body)
        except (binascii.Error, ValueError):
            raw = b""
        try:
            return self.open_bytes(key_id, raw, _associated(key_id, job_id)).decode("utf-8")
        except DecryptionError:
            raise DecryptionError(
                f"a value of job {job_id!r} (key {key_id!r}) does not decrypt: altered, "
                "truncated or another job's"
            ) from None

    def seal_bytes(self, data: bytes, associated: bytes) -> bytes:
        """nonce | ciphertext | tag, with the primary key (its id travels beside it)."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self.ciphers[self.primary].encrypt(nonce, data, associated)

    def open_bytes(self, key_id: str, sealed: bytes, associated: bytes) -> bytes:
        cipher = self.ciphers.get(key_id)
        if cipher is None:
            raise MissingEncryptionKeyError(key_id)
        try:
            return cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
        except (InvalidTag, ValueError):
            raise DecryptionError(f"a value sealed with key {key_id!r} does not decrypt") from None


def _associated(key_id: str, job_id: str) -> bytes:
    return f"jy1\x00{key_id}\x00{job_id}".encode()


def _parts(envelope: str) -> tuple[str, str]:
    key_id, sep, body = envelope[len(MARKER) :].partition("$")
    if not sep or not KEY_ID.fullmatch(key_id):
        raise DecryptionError("a sealed value without a key id")
    return key_id, body


def parse_keys(setting: str) -> KeyRing | None:
    """The ring a JOBYARD_ENCRYPTION_KEYS value describes; None for an empty one."""
    ciphers: dict[str, AESGCM] = {}
    primary = ""
    for item in (part.strip() for part in setting.split(",")):
        if not item:
            continue
        key_id, sep, encoded = item.partition(":")
        if not sep or not KEY_ID.fullmatch(key_id):
            raise EncryptionConfigError(
                f"{env.ENCRYPTION_KEYS}: each key is <id>:<base64 of {KEY_BYTES} bytes>, the id "
                f"1-32 of A-Z a-z 0-9 _ . - (got an entry starting {item[:8]!r}...)"
            )
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise EncryptionConfigError(
                f"{env.ENCRYPTION_KEYS}: key {key_id!r} must be the base64 of {KEY_BYTES} "
                "random bytes (e.g. `jobyard keys new`)"
            )
        if key_id in ciphers:
            raise EncryptionConfigError(f"{env.ENCRYPTION_KEYS}: key id {key_id!r} is used twice")
        ciphers[key_id] = AESGCM(key)
        primary = primary or key_id
    return KeyRing(primary, ciphers) if ciphers else None


def new_key() -> str:
    """A fresh key, base64, for JOBYARD_ENCRYPTION_KEYS."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def _from_env() -> KeyRing | None:
    return parse_keys(env.get(env.ENCRYPTION_KEYS) or "")


#: This process's ring (None: encryption off), read from the environment when the module is
#: first imported (a malformed setting stops the process there) and again by `reset`.
RING: KeyRing | None = _from_env()


def key_ring() -> KeyRing | None:
    return RING


def reset() -> None:
    """Read JOBYARD_ENCRYPTION_KEYS again (tests; a process reads it once)."""
    global RING
    RING = _from_env()


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(MARKER)


def key_id_of(value: Any) -> str | None:
    """The id of the key `value` was sealed with; None when it is not sealed."""
    return _parts(value)[0] if is_sealed(value) else None


def seal(job_id: str, value: Any) -> Any:
    """`value` (JSON data, an error's text) sealed for `job_id`; as it is with encryption off,
    for None, and for a value sealed already (so every storage boundary may seal)."""
    ring = RING
    if ring is None or value is None or is_sealed(value):
        return value
    return ring.seal_text(job_id, json.dumps(value))


def unseal(job_id: str, value: Any) -> Any:
    """What `seal` was given; anything not sealed is returned as it is."""
    if not is_sealed(value):
        return value
    ring = RING
    if ring is None:
        raise MissingEncryptionKeyError(key_id_of(value) or "?")
    return json.loads(ring.open_text(job_id, value))


def seal_json(job_id: str, text: str) -> str:
    """JSON text -> the JSON text of its sealed value (for stores that keep JSON text)."""
    ring = RING
    if ring is None or text.startswith(_JSON_MARKER):
        return text
    return json.dumps(ring.seal_text(job_id, text))


def unseal_json(job_id: str, text: str) -> str:
    """The JSON text `seal_json` was given; text not sealed is returned as it is."""
    if not text.startswith(_JSON_MARKER):
        return text
    ring = RING
    envelope = json.loads(text)
    if ring is None:
        raise MissingEncryptionKeyError(key_id_of(envelope) or "?")
    return ring.open_text(job_id, envelope)


def reseal(job_id: str, value: Any) -> Any:
    """`value` sealed with the primary key (for `jobyard keys rotate`): a value sealed with
    another key is opened and sealed again; one not sealed is sealed; one sealed with the
    primary is returned as it is."""
    ring = key_ring()
    if ring is None or value is None or key_id_of(value) == ring.primary:
        return value
    return seal(job_id, unseal(job_id, value))


def reseal_within(job_id: str, text: str) -> tuple[str, int]:
    """`text` with every sealed value in it that is not on the primary key sealed again with it
    (`jobyard keys rotate`, for Redis's messages and records), and how many were. The
    plaintext is carried over byte for byte; everything around the values is left as it is."""
    ring = key_ring()
    if ring is None:
        return text, 0
    count = 0

    def again(found: re.Match[str]) -> str:
        nonlocal count
        if found.group(1) == ring.primary:
            return found.group(0)
        count += 1
        return ring.seal_text(job_id, ring.open_text(job_id, found.group(0)))

    return ENVELOPE.sub(again, text), count


def key_ids_within(text: str) -> set[str]:
    """The ids of the keys of every sealed value in `text`."""
    return {found.group(1) for found in ENVELOPE.finditer(text)}


def loggable(error: str, error_class: str) -> str:
    """What a log line may show of an error: its text, or with encryption on only its class
    (its message is as private as the payload it may quote)."""
    return error if RING is None else f"{error_class} (message encrypted)"

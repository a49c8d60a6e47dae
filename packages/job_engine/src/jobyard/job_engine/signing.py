"""Webhook signatures in the Standard Webhooks scheme (https://www.standardwebhooks.com/), so a
receiver can verify them with a Standard Webhooks library in any language, or with `verify`.

Headers sent with every delivery:
  webhook-id:        the delivery's job id (the same on every retry: receivers dedupe by it)
  webhook-timestamp: unix seconds when this attempt was signed
  webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.".encode() + raw_body)>
  Idempotency-Key:   the delivery's job id again, for receivers that dedupe by that header

The key: WEBHOOK_SECRET in Standard Webhooks' own form, `whsec_<base64>`, is the base64-decoded
bytes (pass it to a library as is); any other value is used as its UTF-8 bytes (pass
`secret.encode()` to a library, which takes bytes as the raw key).

`verify` accepts a timestamp within DEFAULT_TOLERANCE_SECONDS (5 minutes, the scheme's default)
of the receiver's clock, either way: a captured delivery cannot be replayed later than that.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Headers only the signer sets; a caller's headers of these names (in any case) are dropped.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER, IDEMPOTENCY_HEADER, "content-type")
)
DEFAULT_TOLERANCE_SECONDS = 300
SECRET_PREFIX = "whsec_"
VERSION = "v1"

_TIMESTAMP = re.compile(r"[0-9]{1,12}")  # plain digits: no sign, spaces or exponent


class EmptySecretError(ValueError):
    """Signing or verifying with an empty secret would prove nothing."""


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key for `secret` (see the module docs); refuses an empty one."""
    if isinstance(secret, str):
        if secret.startswith(SECRET_PREFIX):
            try:
                key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("a whsec_ secret must be base64 after the prefix") from None
        else:
            key = secret.encode("utf-8")
    else:
        key = bytes(secret)
    if not key:
        raise EmptySecretError("the webhook secret is empty")
    return key


def compute_signature(secret: str | bytes, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """`v1,<base64>` for one message."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode('ascii')}"


def sign(
    secret: str | bytes, msg_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for `body` sent as message `msg_id`."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: compute_signature(secret, msg_id, ts, body),
    }


def verify(
    secret: str | bytes,
    body: bytes,
    headers: Mapping[str, str],
    *,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """True when `headers` carry a valid signature of `body` by `secret`, signed within
    `tolerance` seconds of `now`. False, never an exception, for anything malformed; an empty
    secret is a programming error and raises EmptySecretError."""
    key = secret_key(secret)
    try:
        lowered = {str(k).lower(): v for k, v in headers.items()}
        msg_id = lowered.get(ID_HEADER)
        timestamp = lowered.get(TIMESTAMP_HEADER)
        signatures = lowered.get(SIGNATURE_HEADER)
        if not (
            isinstance(msg_id, str)
            and isinstance(timestamp, str)
            and isinstance(signatures, str)
            and msg_id
            and _TIMESTAMP.fullmatch(timestamp)
        ):
            return False
        ts = int(timestamp)
        current = time.time() if now is None else now
        if abs(current - ts) > tolerance:
            return False
        signed = f"{msg_id}.{ts}.".encode() + bytes(body)
        expected = hmac.new(key, signed, hashlib.sha256).digest()
        # Several space-separated signatures are allowed (key rotation); any valid one will do.
        for candidate in signatures.split(" "):
            version, _, encoded = candidate.partition(",")
            if version != VERSION or not encoded:
                continue
            try:
                given = base64.b64decode(encoded.encode("ascii"), validate=True)
            except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
                continue
            if hmac.compare_digest(expected, given):
                return True
        return False
    except (TypeError, ValueError, AttributeError, UnicodeError):
        return False

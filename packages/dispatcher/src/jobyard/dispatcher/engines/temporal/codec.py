"""Temporal's side of encryption at rest (jobyard.job_engine.crypto): a payload codec that seals
every payload the client and the worker send (workflow inputs and results, activity arguments and
results, queries, signals) with the key ring's primary key, and failures' messages and stack
traces too (temporalio's encoded attributes move them into a payload, which the codec seals:
without it Temporal keeps an error's text in plain). The same codec answers Temporal's codec
server protocol (`/codec/encode`, `/codec/decode` in jobyard.api), so its UI and CLI show
decrypted payloads to an admin.

A sealed payload: metadata `encoding: binary/encrypted` and `encryption-key-id: <id>`, data
nonce | ciphertext | tag of the whole original Payload (its metadata included). Temporal's own
serialization context does not reach a codec server, so the associated data is a constant, not
the job id: a payload moved between workflows still decrypts, which history cannot be edited to
do anyway. With JOBYARD_ENCRYPTION_KEYS unset, no codec is installed (`data_converter`)."""

from __future__ import annotations

from collections.abc import Sequence

from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)

from jobyard.job_engine import crypto

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
ASSOCIATED = b"jobyard.temporal.v1"


class EncryptionCodec(PayloadCodec):
    """Seals with the ring's primary key, opens with any of its keys; a payload not sealed
    (written before encryption was on) passes through."""

    def __init__(self, ring: crypto.KeyRing) -> None:
        self.ring = ring

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        key_id = self.ring.primary.encode()
        return [
            Payload(
                metadata={"encoding": ENCODING, KEY_ID: key_id},
                data=self.ring.seal_bytes(payload.SerializeToString(), ASSOCIATED),
            )
            for payload in payloads
        ]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                out.append(payload)
                continue
            key_id = payload.metadata.get(KEY_ID, b"").decode()
            out.append(Payload.FromString(self.ring.open_bytes(key_id, payload.data, ASSOCIATED)))
        return out


def data_converter() -> DataConverter:
    """The data converter of every jobyard Temporal client: temporalio's default with encryption
    off, the codec and encoded failure attributes with it on."""
    ring = crypto.key_ring()
    if ring is None:
        return DataConverter.default
    return DataConverter(
        payload_codec=EncryptionCodec(ring),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )

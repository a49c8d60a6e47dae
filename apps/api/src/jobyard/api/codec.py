"""A codec server in Temporal's protocol (POST {endpoint}/encode and {endpoint}/decode, bodies
of `temporal.api.common.v1.Payloads` as proto JSON), on jobyard's Temporal payload codec
(jobyard.dispatcher.engines.temporal.codec): point Temporal's UI or CLI at
`https://<api>/codec` (`temporal workflow show --codec-endpoint ... --codec-auth "Bearer <admin
token>"`) to read payloads in plain. Admin token only: it decrypts whatever it is sent."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payloads

from jobyard.api.auth import ADMIN
from jobyard.api.responses import ADMIN_RESPONSES, doc
from jobyard.dispatcher.engines.temporal.codec import EncryptionCodec
from jobyard.job_engine import crypto, env

router = APIRouter(prefix="/codec", tags=["admin"])

RESPONSES = {
    **ADMIN_RESPONSES,
    400: doc("not Payloads in proto JSON"),
    409: doc(f"encryption is off ({env.ENCRYPTION_KEYS} unset)"),
    422: doc("a payload sealed with a key this process lacks, or altered"),
}


@router.post("/encode", dependencies=ADMIN, responses=RESPONSES)
async def encode(request: Request) -> Response:
    """Payloads sealed with the primary key, as the workers seal them."""
    return await _apply(request, encoding=True)


@router.post("/decode", dependencies=ADMIN, responses=RESPONSES)
async def decode(request: Request) -> Response:
    """Payloads opened (those not sealed come back as they were)."""
    return await _apply(request, encoding=False)


async def _apply(request: Request, *, encoding: bool) -> Response:
    ring = crypto.key_ring()
    if ring is None:
        return JSONResponse({"detail": f"encryption is off: {env.ENCRYPTION_KEYS} is not set"}, 409)
    try:
        given = json_format.Parse(await request.body(), Payloads())
    except (json_format.ParseError, DecodeError, UnicodeDecodeError) as exc:
        return JSONResponse({"detail": f"not Payloads in proto JSON: {exc}"}, 400)
    codec = EncryptionCodec(ring)
    try:
        out = await (codec.encode if encoding else codec.decode)(list(given.payloads))
    except (crypto.MissingEncryptionKeyError, crypto.DecryptionError) as exc:
        return JSONResponse({"detail": str(exc)}, 422)
    return Response(
        json_format.MessageToJson(Payloads(payloads=out)), media_type="application/json"
    )

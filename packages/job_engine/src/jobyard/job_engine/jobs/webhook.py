"""`webhook.deliver`: POST a JSON body to a URL, signed, with retries on transient failures."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx
from pydantic import BaseModel, Field

from jobyard.job_engine import env, netguard, signing
from jobyard.job_engine.context import JobContext
from jobyard.job_engine.errors import PermanentError
from jobyard.job_engine.policy import RetryPolicy
from jobyard.job_engine.registry import job

TIMEOUT_SECONDS = 15.0
USER_AGENT = "jobyard-webhook/0.1"
#: Bytes of a receiver's answer read at most: its status is all a delivery needs, and a huge
#: answer must not fill a worker's memory.
MAX_RESPONSE_BYTES = 64 * 1024
MAX_HEADERS = 50


class WebhookPayload(BaseModel):
    url: netguard.PublicHttpUrl
    body: Any = None
    headers: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_HEADERS,
        description="extra request headers; the signing headers, Idempotency-Key and "
        "Content-Type are jobyard's and are dropped from here in any letter case",
    )


class WebhookRetryableError(Exception):
    """A transient failure (connection error, 429, 5xx): the delivery is retried."""


_client: httpx.Client | None = None


def _http() -> httpx.Client:
    global _client
    if _client is None:
        _client = netguard.guarded_client(
            timeout=TIMEOUT_SECONDS, headers={"User-Agent": USER_AGENT}
        )
    return _client


def _user_headers(headers: dict[str, str]) -> dict[str, str]:
    """The caller's headers minus those jobyard sets (compared case-insensitively, since HTTP
    header names are, and a lower-case duplicate would otherwise be sent first)."""
    return {k: v for k, v in headers.items() if k.strip().lower() not in signing.RESERVED_HEADERS}


def _read_capped(response: httpx.Response, deadline: float) -> int:
    """Read (and discard) at most MAX_RESPONSE_BYTES, stopping at `deadline` too."""
    read = 0
    for chunk in response.iter_raw():
        read += len(chunk)
        if read >= MAX_RESPONSE_BYTES or time.monotonic() > deadline:
            break
    return read


def post_signed(url: str, body: Any, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    """One delivery attempt. Returns the status; raises to retry or to fail for good.

    Errors name the status, never the receiver's body: a job's error is readable by API
    clients, and the body of an internal service is exactly what SSRF is after.
    """
    secret = os.environ.get(env.WEBHOOK_SECRET)
    if not secret:
        raise PermanentError(
            f"{env.WEBHOOK_SECRET} is not set; refusing to send an unsigned webhook"
        )
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    request_headers = {
        **_user_headers(headers),
        "Content-Type": "application/json",
        signing.IDEMPOTENCY_HEADER: job_id,
        **signing.sign(secret, job_id, raw),
    }
    deadline = time.monotonic() + TIMEOUT_SECONDS
    try:
        with _http().stream("POST", url, content=raw, headers=request_headers) as response:
            status = response.status_code
            _read_capped(response, deadline)
    except httpx.TransportError as exc:
        raise WebhookRetryableError(f"{type(exc).__name__} posting to {url}: {exc}") from None
    if status == 429 or status >= 500:
        raise WebhookRetryableError(f"{url} answered {status}")
    if status >= 400:
        raise PermanentError(f"{url} answered {status}")
    return {"status": status}


@job(
    "webhook.deliver",
    queue="default",
    payload=WebhookPayload,
    retry=RetryPolicy(attempts=5, backoff=2.0),
    timeout=TIMEOUT_SECONDS + 5,
    requires_env=(env.WEBHOOK_SECRET,),
    # Over HTTP this would sign any body for any URL with the application's secret.
    http=False,
)
async def deliver(ctx: JobContext, payload: WebhookPayload) -> dict[str, Any]:
    """POST the body as signed JSON; retry connection errors, 429 and 5xx; give up on other 4xx
    and on addresses the SSRF guard refuses."""
    delivered: dict[str, Any] = await ctx.run(
        "post", post_signed, str(payload.url), payload.body, payload.headers, ctx.job_id
    )
    return delivered

"""`webhook.deliver`: POST a JSON body to a URL, signed, with retries on transient failures."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
from pydantic import BaseModel, Field, HttpUrl

from jobyard.job_engine import env, signing
from jobyard.job_engine.errors import PermanentError
from jobyard.job_engine.policy import RetryPolicy
from jobyard.job_engine.registry import job

TIMEOUT_SECONDS = 15.0
USER_AGENT = "jobyard-webhook/0.1"


class WebhookPayload(BaseModel):
    url: HttpUrl
    body: Any = None
    headers: dict[str, str] = Field(default_factory=dict)


class WebhookRetryableError(Exception):
    """A transient failure (connection error, 429, 5xx): the delivery is retried."""


_client: httpx.Client | None = None


def _http() -> httpx.Client:
    global _client
    if _client is None:
        _client = httpx.Client(timeout=TIMEOUT_SECONDS, headers={"User-Agent": USER_AGENT})
    return _client


def post_signed(url: str, body: Any, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    """One delivery attempt. Returns the status; raises to retry or to fail for good."""
    secret = os.environ.get(env.WEBHOOK_SECRET)
    if not secret:
        raise PermanentError(
            f"{env.WEBHOOK_SECRET} is not set; refusing to send an unsigned webhook"
        )
    raw = json.dumps(body, separators=(",", ":")).encode()
    request_headers = {
        **headers,
        "Content-Type": "application/json",
        signing.IDEMPOTENCY_HEADER: job_id,
        **signing.sign(secret, raw),
    }
    try:
        response = _http().post(url, content=raw, headers=request_headers)
    except httpx.TransportError as exc:
        raise WebhookRetryableError(f"{type(exc).__name__} posting to {url}: {exc}") from None
    status = response.status_code
    if status == 429 or status >= 500:
        raise WebhookRetryableError(f"{url} answered {status}")
    if status >= 400:
        raise PermanentError(f"{url} answered {status}: {response.text[:200]}")
    return {"status": status}


@job(
    "webhook.deliver",
    queue="default",
    payload=WebhookPayload,
    retry=RetryPolicy(attempts=5, backoff=2.0),
    timeout=TIMEOUT_SECONDS + 5,
    requires_env=(env.WEBHOOK_SECRET,),
)
async def deliver(ctx: Any, payload: WebhookPayload) -> dict[str, Any]:
    """POST the body as signed JSON; retry connection errors, 429 and 5xx; give up on other 4xx."""
    return await ctx.run(
        "post", post_signed, str(payload.url), payload.body, payload.headers, ctx.job_id
    )

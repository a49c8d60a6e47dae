"""`system.echo`: returns its payload. The canary for health checks and benchmarks."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from jobyard.job_engine.context import JobContext
from jobyard.job_engine.policy import RetryPolicy
from jobyard.job_engine.registry import job


class EchoPayload(BaseModel):
    model_config = ConfigDict(extra="allow")


@job("system.echo", queue="default", payload=EchoPayload, retry=RetryPolicy(attempts=1), timeout=10)
async def echo(ctx: JobContext, payload: EchoPayload) -> dict[str, Any]:
    """Return the payload unchanged."""
    return payload.model_dump(mode="json")

"""Jobs that carry a canary string through every private field: its payload, a step's result,
its progress, its result or its error (tests/api/test_encryption.py)."""

from __future__ import annotations

from pydantic import BaseModel

from jobyard.job_engine import JobContext, RetryPolicy, job


def echo(secret: str) -> dict[str, str]:
    return {"step saw": secret}


def explode(secret: str) -> None:
    raise ValueError(f"failed holding {secret}")


class CanaryPayload(BaseModel):
    secret: str
    fail: bool = False
    sleep: float = 0.0


@job("test.canary", payload=CanaryPayload, retry=RetryPolicy(attempts=1), timeout=60)
async def canary(ctx: JobContext, payload: CanaryPayload) -> dict[str, str]:
    step = await ctx.run("echo", echo, payload.secret)
    await ctx.progress({"note": payload.secret})
    if payload.sleep:
        await ctx.sleep(payload.sleep)
    if payload.fail:  # a step's error: Temporal keeps it as an activity failure too
        await ctx.run("explode", explode, payload.secret)  # one attempt: dead
    return {"result": payload.secret, **step}

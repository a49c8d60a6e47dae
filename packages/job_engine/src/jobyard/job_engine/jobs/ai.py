"""`ai.generate`: a Gemini reply to a prompt, stored in the conversation, optionally called back.

Steps (each a recorded, retried side effect):

1. `generate` - reserve a call in the database limiter (rate window + UTC day), then call Gemini.
   A full rate window waits for the next one inside the step when that is close (at most
   `MAX_RATE_WAIT` seconds, well inside the 30 s job timeout); otherwise the step fails with
   `GeminiRateLimitedError` and the job is retried later. The refused call is never sent. An
   exhausted daily quota fails the job (`PermanentError`).
2. `store` - the reply as a `ConversationMessage` (role assistant, `job_id` unique: idempotent).
3. `notify` - when `webhook_url` is given, `webhook.deliver` with the result, as a child job
   whose id is derived from this job's id.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from jobyard.job_engine import env
from jobyard.job_engine.children import dispatch_child
from jobyard.job_engine.context import JobContext
from jobyard.job_engine.db import Base, session_scope
from jobyard.job_engine.db.models import ConversationMessage
from jobyard.job_engine.errors import PermanentError
from jobyard.job_engine.netguard import PublicHttpUrl
from jobyard.job_engine.policy import RetryPolicy
from jobyard.job_engine.registry import job
from jobyard.job_engine.services.ai import gemini, limiter
from jobyard.job_engine.services.ai.gemini import GeminiRateLimitedError, GeminiSettings

log = logging.getLogger(__name__)

SERVICE = "gemini"
TIMEOUT_SECONDS = 30.0
MAX_RATE_WAIT = 8.0  # seconds a step may wait for the next rate window before deferring
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PreviousMessage(BaseModel):
    role: Literal["user", "assistant", "model"]
    content: str = Field(min_length=1)


class GenerateContext(BaseModel):
    model_config = ConfigDict(extra="allow")

    previous_messages: list[PreviousMessage] = Field(default_factory=list)
    assessment_data: Any = None


class GenerateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, gt=0, le=65_536)

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not MODEL_NAME.match(value.removeprefix("models/")):
            raise ValueError(f"not a Gemini model name: {value!r}")
        return value


class GeneratePayload(BaseModel):
    prompt: str = Field(min_length=1)
    conversation_id: str = Field(min_length=1, max_length=64)
    user_id: str | None = Field(default=None, max_length=64)
    context: GenerateContext = Field(default_factory=GenerateContext)
    options: GenerateOptions = Field(default_factory=GenerateOptions)
    webhook_url: PublicHttpUrl | None = None  # no private addresses (jobyard.job_engine.netguard)


# --- steps -------------------------------------------------------------------------------------


async def generate_reply(model: str | None, request: dict[str, Any]) -> dict[str, Any]:
    """Step: reserve a call in the shared limiter, then send it. Never sends a refused call."""
    settings = GeminiSettings.from_env()
    model = model or settings.default_model
    waited = 0.0
    while True:
        reservation = await asyncio.to_thread(
            limiter.reserve,
            SERVICE,
            rate_limit=settings.rate_limit,
            rate_period=settings.rate_period,
            daily_limit=settings.daily_limit,
        )
        if reservation.granted:
            break
        if reservation.daily_exhausted:
            raise PermanentError(
                f"Gemini daily quota exhausted: {settings.daily_limit} calls already made on "
                f"{reservation.day} (UTC) ({env.GEMINI_DAILY_LIMIT}={settings.daily_limit}); "
                "the quota resets at 00:00 UTC"
            )
        wait = reservation.retry_after + 0.05
        if waited + wait > MAX_RATE_WAIT:
            raise GeminiRateLimitedError(
                f"Gemini rate limit reached ({settings.rate_limit} calls per "
                f"{settings.rate_period:g} s, {env.GEMINI_RATE_LIMIT}); call deferred, "
                f"next window in {reservation.retry_after:.1f} s",
                reservation.retry_after,
            )
        await asyncio.sleep(wait)
        waited += wait
    result = await gemini.generate(settings, model, request)
    usage = result["usage"]
    try:
        await asyncio.to_thread(
            limiter.record_tokens,
            SERVICE,
            reservation.day_start,
            usage["prompt_tokens"],
            usage["output_tokens"],
        )
    except Exception:  # token accounting must never make us send the call again
        log.warning("could not record Gemini token usage", exc_info=True)
    return result


def store_reply(
    job_id: str, conversation_id: str, user_id: str | None, content: str, model: str | None
) -> dict[str, Any]:
    """Step: insert the assistant message once per job (`job_id` is unique); return its id."""
    with session_scope() as session:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        # The Table itself: `__table__` is typed as any FromClause (a mapping may be a join).
        table = Base.metadata.tables[ConversationMessage.__tablename__]
        stmt = (
            insert(table)
            .values(
                conversation_id=conversation_id,
                user_id=user_id,
                role="assistant",
                content=content,
                model=model,
                job_id=job_id,
            )
            .on_conflict_do_nothing(index_elements=[table.c.job_id])
            .returning(table.c.id)
        )
        inserted = session.execute(stmt).scalar_one_or_none()
        if inserted is not None:
            return {"message_id": inserted, "created": True}
        existing = session.execute(
            select(ConversationMessage.id).where(ConversationMessage.job_id == job_id)
        ).scalar_one()
        return {"message_id": existing, "created": False}


# --- the job -----------------------------------------------------------------------------------


@job(
    "ai.generate",
    queue="default",
    payload=GeneratePayload,
    retry=RetryPolicy(attempts=2, backoff=10.0),
    timeout=TIMEOUT_SECONDS,
    requires_env=(env.GEMINI_API_KEY,),
)
async def generate(ctx: JobContext, payload: GeneratePayload) -> dict[str, Any]:
    """Generate a Gemini reply, store it in the conversation, call the webhook back if asked."""
    request = gemini.build_request(
        payload.prompt,
        [m.model_dump() for m in payload.context.previous_messages],
        payload.context.assessment_data,
        payload.options.temperature,
        payload.options.max_tokens,
    )
    reply = await ctx.run("generate", generate_reply, payload.options.model, request)
    stored = await ctx.run(
        "store",
        store_reply,
        ctx.job_id,
        payload.conversation_id,
        payload.user_id,
        reply["text"],
        reply["model"],
    )
    result: dict[str, Any] = {
        "conversation_id": payload.conversation_id,
        "message_id": stored["message_id"],
        "reply": reply["text"],
        "model": reply["model"],
        "finish_reason": reply["finish_reason"],
        "usage": reply["usage"],
    }
    if payload.webhook_url is not None:
        body = {"event": "ai.generate.completed", "job_id": ctx.job_id, **result}
        child = await ctx.run(
            "notify",
            dispatch_child,
            "webhook.deliver",
            {"url": str(payload.webhook_url), "body": body},
            f"{ctx.job_id}:webhook",
        )
        result["webhook_job_id"] = child["job_id"]
    return result

"""The example's job: a chat reply. Its step composes the reply locally (no network, no Gemini
key); swap `compose_reply` for a call to `ai.generate` or your model in a real app."""

from __future__ import annotations

from pydantic import BaseModel, Field

from jobyard.job_engine import RetryPolicy, job


class ChatMessage(BaseModel):
    conversation_id: str = Field(min_length=1, max_length=64)
    message: str = Field(min_length=1, max_length=2000)


def compose_reply(message: str) -> str:
    words = message.split()
    return f"You said {len(words)} word{'s' * (len(words) != 1)}: {message[::-1]!r} backwards."


@job("chat.reply", queue="default", payload=ChatMessage, retry=RetryPolicy(attempts=3), timeout=30)
async def reply(ctx, payload: ChatMessage) -> dict:
    text = await ctx.run("compose", compose_reply, payload.message)
    return {"conversation_id": payload.conversation_id, "reply": text}

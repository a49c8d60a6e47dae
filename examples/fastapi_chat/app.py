"""A FastAPI chat whose replies are jobyard jobs.

- `POST /api/chat/send` dispatches `chat.reply` and answers 202 with the job id at once;
- `GET /api/chat/{job_id}` is the status endpoint the page polls;
- `POST /api/hooks/jobyard` receives the job's completion webhook, verifies its signature
  (WEBHOOK_SECRET) and stores the reply, which the status endpoint then serves;
- `GET /` is the page: it sends a message and shows the reply without reloading.
"""

from __future__ import annotations

import os
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from jobyard.dispatcher import JobNotFoundError, adispatch_job, aget_job, warm_up
from jobyard.job_engine import InvalidPayloadError, signing

PAGE = Path(__file__).with_name("index.html")
#: Where jobyard's webhook.deliver reaches this app (it runs in a worker, not in this process).
PUBLIC_URL = os.environ.get("CHAT_PUBLIC_URL", "http://127.0.0.1:8001")

#: Replies that arrived by webhook, by job id. A real app keeps them in its database.
replies: dict[str, dict] = {}


@asynccontextmanager
async def lifespan(app: FastAPI):
    warm_up()  # import the jobs, connect to Temporal: not in the first request
    yield


app = FastAPI(title="jobyard chat example", lifespan=lifespan)


class SendRequest(BaseModel):
    message: str = Field(min_length=1, max_length=2000)
    conversation_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12], max_length=64)


@app.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> str:
    return PAGE.read_text()


@app.post("/api/chat/send", status_code=status.HTTP_202_ACCEPTED)
async def send(body: SendRequest) -> dict:
    try:
        handle = await adispatch_job(
            "chat.reply",
            {"conversation_id": body.conversation_id, "message": body.message},
            webhook_url=f"{PUBLIC_URL}/api/hooks/jobyard",
        )
    except InvalidPayloadError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None
    return {
        "job_id": handle.job_id,
        "engine": handle.engine,
        "status_url": f"/api/chat/{handle.job_id}",
    }


@app.get("/api/chat/{job_id}")
async def chat_status(job_id: str) -> dict:
    if job_id in replies:  # the webhook came: the reply is here, no need to ask jobyard
        return {"job_id": job_id, "state": "succeeded", "via": "webhook", **replies[job_id]}
    try:
        job = await aget_job(job_id)
    except (JobNotFoundError, ValueError):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such chat job") from None
    return {"job_id": job_id, "state": job.state, "via": "status", "error": job.error}


@app.post("/api/hooks/jobyard", status_code=status.HTTP_204_NO_CONTENT)
async def jobyard_webhook(request: Request) -> None:
    body = await request.body()
    secret = os.environ.get("WEBHOOK_SECRET", "")
    # Standard Webhooks: webhook-id, webhook-timestamp and webhook-signature headers.
    if not secret or not signing.verify(secret, body, request.headers):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "bad webhook signature")
    event = await request.json()
    if event.get("name") == "chat.reply" and event.get("event") == "succeeded":
        replies[event["job_id"]] = {"reply": event["result"]["reply"]}

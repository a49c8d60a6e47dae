"""`send_event(name, data)`: an event from outside for the jobs waiting in
`ctx.wait_for_event(name, match=...)` (the rules: jobyard.job_engine.events). Stored in the
database (table `sent_events`), which every waiting job looks at, on either engine: sending
needs neither Redis nor Temporal."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from jobyard.job_engine import env, strictjson
from jobyard.job_engine.db.sent_events import store
from jobyard.job_engine.events import check_event_data, check_event_name


def send_event(name: str, data: dict[str, Any] | None = None) -> int:
    """Send event `name` with `data` (a JSON object; ValueError otherwise): every job waiting for
    `name` whose `match` fields equal `data`'s resumes with `data` at its next look, and so does
    one whose wait begins up to JOBYARD_EVENT_LOOKBACK seconds from now. Returns its id."""
    check_event_name(name)
    checked = check_event_data({} if data is None else data)
    text = strictjson.dumps(checked).decode("utf-8")
    # Every wait for `name` reads it at each look: bounded as a job's payload is.
    limit = env.get_int(env.MAX_PAYLOAD_BYTES)
    if len(text) > limit:
        raise ValueError(
            f"event data is {len(text)} bytes of JSON; the limit is {limit}"
            f" ({env.MAX_PAYLOAD_BYTES})"
        )
    return store(name, text, time.time())


async def asend_event(name: str, data: dict[str, Any] | None = None) -> int:
    """send_event for async code; never blocks the event loop."""
    return await asyncio.to_thread(send_event, name, data)

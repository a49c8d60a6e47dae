"""The rescue loop of `jobyard temporal-worker` (the moving itself: jobyard.dispatcher.rescue)."""

from __future__ import annotations

import asyncio
import logging

from jobyard.dispatcher import EngineUnavailable, get_dispatcher
from jobyard.dispatcher.rescue import Rescue

log = logging.getLogger("jobyard.rescue")


async def rescue_forever(interval: float) -> None:
    rescue = Rescue.from_env(get_dispatcher().temporal)
    wait = interval
    while True:
        await asyncio.sleep(wait)
        wait = interval
        try:
            await asyncio.to_thread(rescue.run_once)
            # Sooner than `interval` when a queue's last worker is about to be known dead.
            wait = await asyncio.to_thread(rescue.next_pass_in, interval)
        except EngineUnavailable as exc:
            log.debug("rescue pass skipped: %s", exc)
        except Exception:
            log.exception("rescue pass failed")

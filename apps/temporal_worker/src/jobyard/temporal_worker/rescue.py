"""The rescue loop of `jobyard temporal-worker` (the moving itself: jobyard.dispatcher.rescue)."""

from __future__ import annotations

import asyncio
import logging

from jobyard.dispatcher import EngineUnavailable, get_dispatcher
from jobyard.dispatcher.rescue import Rescue

log = logging.getLogger("jobyard.rescue")


async def rescue_forever(interval: float) -> None:
    rescue = Rescue.from_env(get_dispatcher().temporal)
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(rescue.run_once)
        except EngineUnavailable as exc:
            log.debug("rescue pass skipped: %s", exc)
        except Exception:
            log.exception("rescue pass failed")

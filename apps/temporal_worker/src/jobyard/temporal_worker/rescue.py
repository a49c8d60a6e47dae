"""The rescue loop of `jobyard temporal-worker` (the moving itself: jobyard.dispatcher.rescue),
and the flow-control upkeep that shares its interval (flow_sweep.py)."""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client

from jobyard.dispatcher import EngineUnavailable, get_dispatcher
from jobyard.dispatcher.rescue import Rescue
from jobyard.temporal_worker.flow_sweep import FlowSweep

log = logging.getLogger("jobyard.rescue")


async def rescue_forever(interval: float, client: Client) -> None:
    rescue = Rescue.from_env(get_dispatcher().temporal)
    sweep = FlowSweep(client)
    wait = interval
    while True:
        await asyncio.sleep(wait)
        wait = interval
        try:
            await sweep.run_once()
        except Exception:  # the database away: the waiters also ask again by themselves
            log.warning("flow-control sweep failed", exc_info=True)
        try:
            await asyncio.to_thread(rescue.run_once)
            # Sooner than `interval` when a queue's last worker is about to be known dead.
            wait = await asyncio.to_thread(rescue.next_pass_in, interval)
        except EngineUnavailable as exc:
            log.debug("rescue pass skipped: %s", exc)
        except Exception:
            log.exception("rescue pass failed")

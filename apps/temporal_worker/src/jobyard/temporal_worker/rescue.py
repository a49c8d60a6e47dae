"""The rescue loop of `jobyard temporal-worker` (the moving itself: jobyard.dispatcher.rescue),
and, in the same interval, the flow-control sweep for the workflows waiting for a concurrency
slot that came back by a lease's expiry (no release woke them): the rescue's own sweep wakes
the parked Dramatiq jobs, through Redis; this one signals the workflows, so it runs while Redis
is down too."""

from __future__ import annotations

import asyncio
import logging

from jobyard.dispatcher import EngineUnavailable, get_dispatcher
from jobyard.dispatcher.engines.temporal import TemporalEngine
from jobyard.dispatcher.flow import WaiterSweep
from jobyard.dispatcher.rescue import Rescue

log = logging.getLogger("jobyard.rescue")


async def rescue_forever(interval: float) -> None:
    temporal = get_dispatcher().temporal
    rescue = Rescue.from_env(temporal)
    assert isinstance(temporal, TemporalEngine)  # this worker's dispatcher: TEMPORAL_ADDRESS's
    sweep = WaiterSweep(lambda _queue, job_ids: temporal.wake(job_ids))
    wait = interval
    while True:
        await asyncio.sleep(wait)
        wait = interval
        try:
            await asyncio.to_thread(sweep.run_once)
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

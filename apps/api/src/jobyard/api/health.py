"""Is each engine reachable from this process? Probed with tight timeouts: a load balancer
polls /health and must get an answer in well under a second even when an engine hangs."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import redis
from temporalio.client import Client
from temporalio.service import RPCError

from jobyard.job_engine import env
from jobyard.queue.client import get_client

log = logging.getLogger("jobyard.api.health")

#: Seconds a Temporal connect or health RPC may take before Temporal counts as down.
TEMPORAL_PROBE_TIMEOUT = 1.0


def redis_ok() -> bool:
    """One PING on the dispatcher's client (REDIS_TIMEOUT bounds it, no retries)."""
    try:
        return bool(get_client().ping())
    except redis.RedisError as exc:
        log.info("health: Redis unreachable: %s", exc)
        return False


class TemporalProbe:
    """Keeps one client per (address, namespace) on the server's event loop; a probe is one
    gRPC health check. A broken client is dropped so the next probe reconnects."""

    def __init__(self) -> None:
        self._client: Client | None = None
        self._target: tuple[str, str] | None = None

    async def ok(self) -> bool:
        target = (env.get_str(env.TEMPORAL_ADDRESS), env.get_str(env.TEMPORAL_NAMESPACE))
        try:
            if self._client is None or self._target != target:
                self._client = await asyncio.wait_for(
                    Client.connect(target[0], namespace=target[1]), TEMPORAL_PROBE_TIMEOUT
                )
                self._target = target
            return await self._client.service_client.check_health(
                timeout=timedelta(seconds=TEMPORAL_PROBE_TIMEOUT)
            )
        except (RuntimeError, OSError, TimeoutError, RPCError) as exc:
            log.info("health: Temporal unreachable at %s: %s", target[0], exc)
            self._client = None
            return False

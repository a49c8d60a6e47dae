"""Moves jobs queued on Dramatiq to Temporal when their queue has no live worker left.

Runs inside `jobyard temporal-worker`, the process that is alive when the Dramatiq workers are
not. Each pass: return messages held by dead workers to their queues (Dramatiq's maintenance),
move never-started jobs of worker-less queues to the handoff list in one Lua call, start their
workflows, and only then drop them from the handoff list. A crash anywhere repeats a start that
Temporal refuses (same workflow id), never loses a job, and never runs one on both engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from jobyard.job_engine import env
from jobyard.job_engine.lifecycle import dispatched_event
from jobyard.queue import keys
from jobyard.queue.broker import requeue_from_dead_workers
from jobyard.queue.client import get_client
from jobyard.queue.messages import RETRY, WEBHOOK
from jobyard.queue.queues import queue_names
from jobyard.queue.store import JobStore
from jobyard.temporal_worker.workflow import WORKFLOW_NAME

log = logging.getLogger("jobyard.rescue")
FALLBACK_RESCUED = "rescued_from_dead_workers"


def _request(data: bytes) -> dict:
    message = Message.decode(data)
    job_id, payload = message.args
    return {
        "job_id": job_id,
        "name": message.actor_name,
        "queue": message.queue_name.removesuffix(keys.DELAY_SUFFIX),
        "payload": payload,
        "claim": "none",  # the rescue already marked the job Temporal's
        "fallback_reason": FALLBACK_RESCUED,
        "webhook_url": message.options.get(WEBHOOK),
        "retry": message.options.get(RETRY),
    }


class Rescuer:
    def __init__(self, client: Client, task_queue: str) -> None:
        self.client = client
        self.task_queue = task_queue
        redis_client = get_client(timeout=env.get_float(env.WORKER_REDIS_TIMEOUT))
        self.store = JobStore(redis_client)
        self.broker = RedisBroker(client=redis_client, namespace=keys.DRAMATIQ_NAMESPACE,
                                  heartbeat_timeout=self._timeout_ms())  # fmt: skip

    @staticmethod
    def _timeout_ms() -> int:
        return int(env.get_float(env.WORKER_HEARTBEAT_TIMEOUT) * 1000)

    def collect(self) -> list[bytes]:
        for queue in queue_names():
            requeue_from_dead_workers(self.broker, queue)
            moved = self.store.rescue(queue, self._timeout_ms())
            if moved:
                log.warning(
                    "queue %s has no live worker: %d job(s) moved to Temporal", queue, moved
                )
        return self.store.handoffs()

    async def start_all(self, handoffs: list[bytes]) -> None:
        for data in handoffs:
            request = _request(data)
            handed_over = time.time()  # before the start: the job may finish before it returns
            # Already started: by an earlier pass that crashed before cleaning up.
            with contextlib.suppress(WorkflowAlreadyStartedError):
                await self.client.start_workflow(
                    WORKFLOW_NAME,
                    request,
                    id=request["job_id"],
                    task_queue=self.task_queue,
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                )
            await asyncio.to_thread(self.store.handoff_done, data)
            dispatched_event(
                request["job_id"], request["name"], request["queue"], "temporal",
                request["payload"], FALLBACK_RESCUED, handed_over,
            )  # fmt: skip

    async def run_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                handoffs = await asyncio.to_thread(self.collect)
                await self.start_all(handoffs)
            except (redis.RedisError, OSError) as exc:
                log.debug("rescue pass skipped: %s", exc)
            except Exception:
                log.exception("rescue pass failed")

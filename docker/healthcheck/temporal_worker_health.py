"""Health check of the temporal-worker container: exit 0 while a Temporal worker in THIS
container polls jobyard's task queue for both workflow and activity tasks, 1 otherwise.

Why not `jobyard health`: it checks the Dramatiq heartbeats in Redis, which a Temporal
worker does not publish, so it would call every Temporal worker dead. Temporal itself
knows who polls: DescribeTaskQueue lists the pollers with their identity, which the
Python SDK sets to "<pid>@<hostname>", and a container's hostname is its own.

Run as `python temporal_worker_health.py`; it reads the same TEMPORAL_* variables as the
worker. The image copies it to /opt/jobyard/temporal_worker_health.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from datetime import timedelta

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

from jobyard.job_engine import env

# A live worker starts a new long poll at least every ~70 s (the server's long-poll
# timeout); Temporal keeps a gone poller listed for minutes. Older than this is stale.
POLLER_STALE_AFTER_SECONDS = 120.0
RPC_TIMEOUT_SECONDS = 5.0
TASK_TYPES = {
    "workflow": TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    "activity": TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
}


async def check(hostname: str) -> tuple[bool, str]:
    address = env.get_str(env.TEMPORAL_ADDRESS)
    namespace = env.get_str(env.TEMPORAL_NAMESPACE)
    task_queue = env.get_str(env.TEMPORAL_TASK_QUEUE)
    try:
        client = await asyncio.wait_for(
            Client.connect(address, namespace=namespace), RPC_TIMEOUT_SECONDS
        )
        suffix = f"@{hostname}"
        now = time.time()
        for kind, task_type in TASK_TYPES.items():
            response = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=namespace,
                    task_queue=TaskQueue(name=task_queue),
                    task_queue_type=task_type,
                ),
                timeout=timedelta(seconds=RPC_TIMEOUT_SECONDS),
            )
            live = [
                poller
                for poller in response.pollers
                if poller.identity.endswith(suffix)
                and now - poller.last_access_time.ToSeconds() < POLLER_STALE_AFTER_SECONDS
            ]
            if not live:
                return (
                    False,
                    f"unhealthy: no worker on {hostname} polls {kind} tasks of {task_queue}",
                )
    except (RPCError, RuntimeError, TimeoutError, OSError) as exc:
        return False, f"unhealthy: Temporal at {address} unreachable ({exc})"
    return True, f"healthy: {hostname} polls {task_queue}"


def main() -> None:
    ok, message = asyncio.run(check(socket.gethostname()))
    print(message, flush=True)
    # os._exit, not sys.exit: the SDK's Rust core keeps threads that can abort the
    # interpreter's finalisation (SIGABRT, "PyGILState_Release"), which would turn a
    # healthy verdict into a failed health check now and then.
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()

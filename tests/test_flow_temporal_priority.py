"""The dev server orders a backlog by task priority once configured as docs/flow-control.md
says (new matcher, one partition, 201 levels), so jobyard's priorities -100..100 map to
`priority_key = 101 - p` exactly, equal priorities in dispatch order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import Priority
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from tests.support import temporal_cli

#: The dynamic config a server needs for exact priority order (docs/flow-control.md).
PRIORITY_FLAGS = [
    "--dynamic-config-value", "matching.useNewMatcher=true",
    "--dynamic-config-value", "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value", "matching.numTaskqueueWritePartitions=1",
    "--dynamic-config-value", "matching.priorityLevels=201",
]  # fmt: skip

ran: list[int] = []


@activity.defn(name="flow.record")
async def record(index: int) -> None:
    ran.append(index)


@workflow.defn(name="flow.one_step")
class OneStep:
    @workflow.run
    async def run(self, index: int) -> None:
        await workflow.execute_activity(record, index, start_to_close_timeout=timedelta(seconds=30))


def priority_key(priority: int) -> int:
    """jobyard's priority (-100..100, higher first) as Temporal's (1..201, lower first)."""
    return 101 - priority


@pytest.fixture(scope="module")
def env() -> Iterator[WorkflowEnvironment]:
    loop = asyncio.new_event_loop()
    environment = loop.run_until_complete(
        WorkflowEnvironment.start_local(
            dev_server_existing_path=temporal_cli(), ui=False, dev_server_log_level="error",
            dev_server_extra_args=PRIORITY_FLAGS,
        )
    )  # fmt: skip
    yield environment
    loop.run_until_complete(environment.shutdown())
    loop.close()


def test_a_backlog_runs_highest_priority_first_equal_ones_in_dispatch_order(
    env: WorkflowEnvironment,
) -> None:
    priorities = [-100, 100, 0, -50, 100, -1, 0, 99, -99, 100, 1]

    async def scenario() -> None:
        client = await Client.connect(env.client.service_client.config.target_host)
        queue = f"flow-priority-{uuid.uuid4().hex[:8]}"
        # Workflows run first, with no activity worker, each started once the one before has
        # scheduled its step: the steps wait in the backlog in dispatch order. (Started all at
        # once, a worker running several workflow tasks at a time could schedule two equal
        # priorities' steps in either order: docs/flow-control.md, Priorities.)
        handles = []
        async with Worker(
            client, task_queue=queue, workflows=[OneStep], activities=[],
            workflow_runner=UnsandboxedWorkflowRunner(),
        ):  # fmt: skip
            for index, p in enumerate(priorities):
                handle = await client.start_workflow(
                    OneStep.run,
                    index,
                    id=f"flow-{queue}-{index}",
                    task_queue=queue,
                    priority=Priority(priority_key=priority_key(p)),
                )
                handles.append(handle)
                for _ in range(600):
                    described = await handle.describe()
                    if described.raw_description.pending_activities:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"{handle.id} never scheduled its step")
        async with Worker(
            client, task_queue=queue, workflows=[OneStep], activities=[record],
            max_concurrent_activities=1, workflow_runner=UnsandboxedWorkflowRunner(),
        ):  # fmt: skip
            for handle in handles:
                await handle.result()

    ran.clear()
    asyncio.run(scenario())
    expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
    assert ran == expected, [priorities[i] for i in ran]

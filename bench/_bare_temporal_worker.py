"""A bare Temporal baseline, on its own task queue, in one process with the SDK's default worker
settings:

- `bare.echo` (bench_temporal_fallback): one workflow that runs one activity;
- `bare.workload` (bench_workloads): as many activities and local activities as jobyard's
  workflow runs for the same job: its steps (`io_step`, a sync activity on a thread pool as
  jobyard's steps are) and the two state events jobyard records through local activities
  (three with a sleep, which jobyard reports), here ones that do nothing, and the same timer.

    python bench/_bare_temporal_worker.py <address> <task queue>
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    from _workload import io_step

WORKFLOW = "bare.echo"
WORKLOAD_WORKFLOW = "bare.workload"


@activity.defn(name="bare.echo_activity")
async def echo_activity(payload: Any) -> Any:
    return payload


@activity.defn(name="bare.step")
def step_activity(order: Any) -> Any:
    return io_step(order)


@activity.defn(name="bare.event")
async def event_activity(event: Any) -> None:
    return None


@workflow.defn(name=WORKFLOW)
class EchoWorkflow:
    @workflow.run
    async def run(self, payload: Any) -> Any:
        return await workflow.execute_activity(
            echo_activity, payload, start_to_close_timeout=timedelta(seconds=30)
        )


@workflow.defn(name=WORKLOAD_WORKFLOW)
class WorkloadWorkflow:
    """args: [payload, steps, sleep seconds after the first step]."""

    @workflow.run
    async def run(self, args: list[Any]) -> Any:
        payload, steps, sleep = args
        event = {"i": payload["i"]}
        timeout = timedelta(seconds=30)
        await workflow.execute_local_activity(event_activity, event, start_to_close_timeout=timeout)
        result = None
        for n in range(steps):
            if n == 1 and sleep:
                await workflow.execute_local_activity(
                    event_activity, event, start_to_close_timeout=timeout
                )
                await workflow.sleep(timedelta(seconds=sleep))
            result = await workflow.execute_activity(
                step_activity, payload.get("order"), start_to_close_timeout=timeout
            )
        await workflow.execute_local_activity(event_activity, event, start_to_close_timeout=timeout)
        return result


async def main(address: str, task_queue: str) -> None:
    client = await Client.connect(address)
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[EchoWorkflow, WorkloadWorkflow],
        activities=[echo_activity, step_activity, event_activity],
        activity_executor=ThreadPoolExecutor(100),
    )
    print("bare Temporal worker polling", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

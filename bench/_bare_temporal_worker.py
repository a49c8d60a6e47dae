"""A bare Temporal baseline for the fallback benchmark: one workflow that runs one activity,
on its own task queue, in one process with the SDK's default worker settings.

    python bench/_bare_temporal_worker.py <address> <task queue>
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

WORKFLOW = "bare.echo"


@activity.defn(name="bare.echo_activity")
async def echo_activity(payload: Any) -> Any:
    return payload


@workflow.defn(name=WORKFLOW)
class EchoWorkflow:
    @workflow.run
    async def run(self, payload: Any) -> Any:
        return await workflow.execute_activity(
            echo_activity, payload, start_to_close_timeout=timedelta(seconds=30)
        )


async def main(address: str, task_queue: str) -> None:
    client = await Client.connect(address)
    worker = Worker(
        client, task_queue=task_queue, workflows=[EchoWorkflow], activities=[echo_activity]
    )
    print("bare Temporal worker polling", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

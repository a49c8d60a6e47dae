"""`jobyard temporal-worker`: the generic workflow and the step activities on one task queue."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from jobyard.dispatcher.engines.temporal.engine import interceptors
from jobyard.job_engine import env, tracing
from jobyard.job_engine.registry import load_job_modules
from jobyard.temporal_worker.activities import JobActivities
from jobyard.temporal_worker.claims import RedisClaims
from jobyard.temporal_worker.journal import StepRecords
from jobyard.temporal_worker.rescue import rescue_forever
from jobyard.temporal_worker.workflow import JobWorkflow

log = logging.getLogger("jobyard.temporal_worker")
CONNECT_RETRY_SECONDS = 2.0


def job_activities() -> JobActivities:
    """The activities with what they need, made once per worker from the environment."""
    return JobActivities(RedisClaims.from_env(), StepRecords.from_env())


def build_worker(
    client: Client, task_queue: str | None = None, activities: JobActivities | None = None
) -> Worker:
    load_job_modules()  # import job modules here, so the sandbox passes them through
    return Worker(
        client,
        task_queue=task_queue or env.get_str(env.TEMPORAL_TASK_QUEUE),
        workflows=[JobWorkflow],
        activities=(activities or job_activities()).all(),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
        ),
        graceful_shutdown_timeout=timedelta(seconds=env.get_float(env.WORKER_SHUTDOWN_GRACE)),
        # As many steps accepted as there are threads to run them (activities.py).
        max_concurrent_activities=env.get_int(env.TEMPORAL_STEP_CONCURRENCY),
    )


async def connect(address: str, namespace: str) -> Client:
    while True:
        try:
            # With tracing on, the workflows and activities continue the dispatch's trace
            # from Temporal's headers (temporalio's TracingInterceptor).
            return await Client.connect(
                address, namespace=namespace, interceptors=interceptors(worker=True)
            )
        except RuntimeError as exc:
            log.warning("Temporal at %s not reachable (%s); retrying", address, exc)
            await asyncio.sleep(CONNECT_RETRY_SECONDS)


def install_child_dispatcher() -> None:
    from jobyard.dispatcher import install_child_dispatcher as install

    install()


async def serve() -> None:
    tracing.setup_from_env()
    install_child_dispatcher()
    client = await connect(env.get_str(env.TEMPORAL_ADDRESS), env.get_str(env.TEMPORAL_NAMESPACE))
    task_queue = env.get_str(env.TEMPORAL_TASK_QUEUE)
    worker = build_worker(client, task_queue)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rescuer = asyncio.create_task(rescue_forever(env.get_float(env.RESCUE_INTERVAL)))
    from jobyard.dispatcher.scheduler import start_scheduler_thread

    start_scheduler_thread(scheduler_stop := threading.Event(), role="temporal-worker")
    from jobyard.dispatcher.relay import start_relay_thread

    start_relay_thread(scheduler_stop)  # the dispatch outbox's relay: stops with the scheduler
    async with worker:
        log.info("Temporal worker polling %s", task_queue)
        await stop.wait()
        rescuer.cancel()
        scheduler_stop.set()
        log.info("Temporal worker stopping")


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    asyncio.run(serve())

"""`jobyard temporal-worker`: the generic workflow (and the claims) on the main task queue,
each jobyard queue's steps on a task queue of their own, polled with the queue's concurrency
as activity slots (docs/flow-control.md "Per-queue concurrency on Temporal")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from jobyard.dispatcher.engines.temporal.codec import data_converter
from jobyard.dispatcher.engines.temporal.contract import step_task_queue
from jobyard.dispatcher.engines.temporal.engine import interceptors
from jobyard.job_engine import env, tracing
from jobyard.job_engine.queues import get_queue, queue_names
from jobyard.job_engine.registry import load_job_modules
from jobyard.temporal_worker.activities import STEP_THREADS, JobActivities
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
    """The main task queue's Worker: every job's workflow, the claims."""
    load_job_modules()  # import job modules here, so the sandbox passes them through
    return Worker(
        client,
        task_queue=task_queue or env.get_str(env.TEMPORAL_TASK_QUEUE),
        workflows=[JobWorkflow],
        activities=(activities or job_activities()).all(),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
        ),
        graceful_shutdown_timeout=_grace(),
        # As many steps accepted as there are threads to run them (activities.py).
        max_concurrent_activities=env.get_int(env.TEMPORAL_STEP_CONCURRENCY),
    )


def build_step_workers(
    client: Client,
    task_queue: str,
    queues: list[str] | None = None,
    activities: JobActivities | None = None,
) -> list[Worker]:
    """A Worker per jobyard queue (`queues`, default every declared one) on its step task
    queue, with the queue's concurrency (WORKER_CONCURRENCY_<QUEUE> included) as its activity
    slots: at most that many steps of the queue run at once in this process, and a queue
    whose slots are all taken holds up no other queue's steps."""
    activities = activities or job_activities()
    workers = []
    for name in queues or queue_names():
        concurrency = get_queue(name).concurrency
        steps_on = step_task_queue(task_queue, name)
        STEP_THREADS.size(steps_on, concurrency)  # a thread per slot for sync steps
        workers.append(
            Worker(
                client,
                task_queue=steps_on,
                activities=activities.steps(),
                graceful_shutdown_timeout=_grace(),
                max_concurrent_activities=concurrency,
            )
        )
    return workers


def _grace() -> timedelta:
    return timedelta(seconds=env.get_float(env.WORKER_SHUTDOWN_GRACE))


async def connect(address: str, namespace: str) -> Client:
    while True:
        try:
            # With tracing on, the workflows and activities continue the dispatch's trace
            # from Temporal's headers (temporalio's TracingInterceptor).
            return await Client.connect(
                address,
                namespace=namespace,
                data_converter=data_converter(),
                interceptors=interceptors(worker=True),
            )
        except RuntimeError as exc:
            log.warning("Temporal at %s not reachable (%s); retrying", address, exc)
            await asyncio.sleep(CONNECT_RETRY_SECONDS)


def serve_metrics() -> None:
    """/metrics on TEMPORAL_WORKER_METRICS_PORT: this process's job counters and flow-control
    refusals, the workflows it holds for a limit now (per queue and per key), and, when a job
    is limited, the permit store's counts per limit and busiest keys (both engines'). After the
    job modules are loaded (whether any job is limited)."""
    port = env.get_int(env.TEMPORAL_WORKER_METRICS_PORT)
    if port <= 0:
        return
    from prometheus_client import start_http_server

    from jobyard.dispatcher.metrics import flow_collector, process_registry
    from jobyard.job_engine.flow.metrics import HELD_RUNS

    registry = process_registry()
    for collector in (HELD_RUNS, flow_collector()):
        if collector is not None:
            registry.register(collector)
    # Loopback by default, as `jobyard worker`'s: the metrics carry job names and keys, no token.
    host = env.get_str(env.WORKER_METRICS_HOST)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # another temporal-worker on this host has the port: say so, go on
        log.warning("metrics not served: %s:%d unavailable (%s)", host, port, exc)
        return
    log.info("temporal-worker metrics on %s:%d/metrics", host, port)


def install_child_dispatcher() -> None:
    """Jobs here start child jobs through the dispatcher, and a release here wakes the parked
    Dramatiq jobs it frees a slot for (flow control in a mixed run)."""
    from jobyard.dispatcher import install_child_dispatcher as install
    from jobyard.dispatcher.flow import install_cross_engine_wake

    install()
    install_cross_engine_wake("temporal")


async def serve(queues: list[str] | None = None) -> None:
    """Run the workflows and the steps of `queues` (default: every declared queue)."""
    tracing.setup_from_env()
    install_child_dispatcher()
    client = await connect(env.get_str(env.TEMPORAL_ADDRESS), env.get_str(env.TEMPORAL_NAMESPACE))
    task_queue = env.get_str(env.TEMPORAL_TASK_QUEUE)
    activities = job_activities()
    workers = [
        build_worker(client, task_queue, activities),
        *build_step_workers(client, task_queue, queues, activities),
    ]
    serve_metrics()  # the job modules are loaded now
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rescuer = asyncio.create_task(rescue_forever(env.get_float(env.RESCUE_INTERVAL)))
    from jobyard.dispatcher.scheduler import start_scheduler_thread

    start_scheduler_thread(scheduler_stop := threading.Event(), role="temporal-worker")
    from jobyard.dispatcher.relay import start_relay_thread

    start_relay_thread(scheduler_stop)  # the dispatch outbox's relay: stops with the scheduler
    async with contextlib.AsyncExitStack() as running:
        for worker in workers:
            await running.enter_async_context(worker)
        steps = ", ".join(w.task_queue for w in workers[1:])
        log.info("Temporal worker polling %s (steps: %s)", task_queue, steps)
        await stop.wait()
        rescuer.cancel()
        scheduler_stop.set()
        log.info("Temporal worker stopping")


def main(queues: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    asyncio.run(serve(queues))

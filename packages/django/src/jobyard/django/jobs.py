"""The jobyard jobs that run Django tasks: `django.task.<queue>`, one per jobyard queue.

A Django task's own outcome (its return value, or its exception and traceback) is the job's
result, so that both engines report it the same way; the job itself fails only when the task
could not be run at all (its module does not import, Django is not configured). Django is
imported in the step, never here: a worker imports this module before Django is set up.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from pydantic import BaseModel, ConfigDict

from jobyard.job_engine import JobContext, RetryPolicy, job
from jobyard.job_engine.queues import queue_names

#: A worker's id in Django's `TaskResult.worker_ids`.
WORKER_ID = f"jobyard:{socket.gethostname()}:{os.getpid()}"


def job_name(queue: str) -> str:
    return f"django.task.{queue.replace('-', '_')}"


class DjangoTaskPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str  # the Task's module path, e.g. "myapp.tasks.send_receipt"
    args: list[Any]
    kwargs: dict[str, Any]
    backend: str
    takes_context: bool = False


def _setup_django() -> None:
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()


def run_task(payload: dict[str, Any], job_id: str, attempt: int) -> dict[str, Any]:
    """Run the Django task, sending task_started and task_finished as Django's backends do."""
    _setup_django()
    from django.utils import timezone
    from django.utils.module_loading import import_string
    from jobyard.django import compat

    task = import_string(payload["task"])
    backend = task.get_backend()
    started = timezone.now()
    result = compat.TaskResult(
        task=task, id=job_id, status=compat.TaskResultStatus.RUNNING, enqueued_at=None,
        started_at=started, last_attempted_at=started, finished_at=None,
        args=payload["args"], kwargs=payload["kwargs"], backend=payload["backend"],
        errors=[], worker_ids=[WORKER_ID] * attempt,
    )  # fmt: skip
    compat.task_started.send(sender=type(backend), task_result=result)
    outcome: dict[str, Any]
    try:
        if payload.get("takes_context"):
            context = compat.TaskContext(task_result=result)
            value = task.call(context, *payload["args"], **payload["kwargs"])
        else:
            value = task.call(*payload["args"], **payload["kwargs"])
        outcome = {"return_value": compat.normalize_json(value)}
        status = compat.TaskResultStatus.SUCCESSFUL
    except (Exception, SystemExit) as exc:
        error = compat.TaskError(
            exception_class_path=compat.get_module_path(type(exc)),
            traceback=compat.get_exception_traceback(exc),
        )
        result.errors.append(error)
        outcome = {"exception_class_path": error.exception_class_path, "traceback": error.traceback}
        status = compat.TaskResultStatus.FAILED
    object.__setattr__(result, "status", status)
    object.__setattr__(result, "finished_at", timezone.now())
    compat.task_finished.send(sender=type(backend), task_result=result)
    return outcome


async def run_task_in_thread(payload: dict[str, Any], job_id: str, attempt: int) -> dict[str, Any]:
    """The step: in a thread of its own, since Django's ORM and async_to_sync refuse to run in
    a thread with a running event loop (a Dramatiq worker runs steps in the job's loop)."""
    return await asyncio.to_thread(run_task, payload, job_id, attempt)


def _declare(queue: str) -> None:
    @job(job_name(queue), queue=queue, payload=DjangoTaskPayload, retry=RetryPolicy(attempts=3))
    async def run(ctx: JobContext, payload: DjangoTaskPayload) -> dict[str, Any]:
        done: dict[str, Any] = await ctx.run(
            "task", run_task_in_thread, payload.model_dump(), ctx.job_id, 1
        )
        return done


for _queue in queue_names():
    _declare(_queue)

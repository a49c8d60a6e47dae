"""`JobyardBackend`: Django's task backend API on jobyard's dispatch_job and get_job."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async

from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from django.utils.module_loading import import_string
from jobyard.dispatcher import (
    JobNotFoundError,
    adispatch_job,
    dispatch_job,
    get_job,
    get_job_record,
)
from jobyard.django import compat, transactional
from jobyard.django.jobs import DjangoTaskPayload, job_name
from jobyard.job_engine.ids import new_job_id
from jobyard.job_engine.queues import queue_names
from jobyard.job_engine.states import JobState

#: jobyard's states as Django's. A job that succeeded may still hold a task that raised.
STATES = {
    JobState.QUEUED: compat.TaskResultStatus.READY,
    JobState.RETRYING: compat.TaskResultStatus.READY,
    JobState.RUNNING: compat.TaskResultStatus.RUNNING,
    JobState.SUCCEEDED: compat.TaskResultStatus.SUCCESSFUL,
    JobState.FAILED: compat.TaskResultStatus.FAILED,
    JobState.DEAD: compat.TaskResultStatus.FAILED,
    JobState.CANCELLED: compat.TaskResultStatus.FAILED,
}


class JobyardBackend(compat.BaseTaskBackend):  # type: ignore[misc]  # django-tasks has no hints
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True  # Django's -100..100, higher first: jobyard's own scale

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        # OPTIONS "transactional": enqueue into the dispatch outbox on Django's connection
        # "database" (default "default"): the task runs if and only if the enqueuing
        # transaction commits (jobyard/django/transactional.py).
        self.transactional = bool(self.options.get("transactional", False))
        self.database = str(self.options.get("database", "default"))
        unknown = sorted(set(self.queues) - set(queue_names()))
        if unknown:
            raise ImproperlyConfigured(
                f"TASKS[{alias!r}]['QUEUES'] names queues jobyard does not have: {unknown} "
                f"(jobyard's queues: {queue_names()})"
            )

    def _prepare(
        self, task: compat.Task, args: Any, kwargs: Any
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        self.validate_task(task)
        payload = DjangoTaskPayload(
            task=task.module_path, args=compat.normalize_json(list(args)),
            kwargs=compat.normalize_json(dict(kwargs)), backend=self.alias,
            takes_context=task.takes_context,
        )  # fmt: skip
        options: dict[str, Any] = {"job_id": new_job_id()}
        if task.run_after is not None:
            options["delay"] = max(0.0, (task.run_after - timezone.now()).total_seconds())
        if task.priority:  # 0, Django's default, leaves the job's own (@job priority=)
            options["priority"] = task.priority
        return job_name(task.queue_name), payload.model_dump(), options

    def _enqueued(self, task: compat.Task, job_id: str, args: Any, kwargs: Any) -> Any:
        result = compat.TaskResult(
            task=task, id=job_id, status=compat.TaskResultStatus.READY,
            enqueued_at=timezone.now(), started_at=None, last_attempted_at=None,
            finished_at=None, args=list(args), kwargs=dict(kwargs), backend=self.alias,
            errors=[], worker_ids=[],
        )  # fmt: skip
        compat.task_enqueued.send(type(self), task_result=result)
        return result

    def enqueue(self, task: compat.Task, args: Any, kwargs: Any) -> compat.TaskResult:
        name, payload, options = self._prepare(task, args, kwargs)
        if self.transactional:
            handle = transactional.enqueue(self.database, name, payload, options)
        else:
            handle = dispatch_job(name, payload, **options)
        return self._enqueued(task, handle.job_id, args, kwargs)

    async def aenqueue(self, task: compat.Task, args: Any, kwargs: Any) -> compat.TaskResult:
        if self.transactional:  # Django's connections are used from sync code only
            return await sync_to_async(self.enqueue)(task, args, kwargs)
        name, payload, options = self._prepare(task, args, kwargs)
        handle = await adispatch_job(name, payload, **options)
        return self._enqueued(task, handle.job_id, args, kwargs)

    def get_result(self, result_id: str) -> compat.TaskResult:
        try:
            status = get_job(result_id)
        except (JobNotFoundError, ValueError):
            raise compat.TaskResultDoesNotExist(result_id) from None
        record = _record(result_id)
        if record is None or not (status.name or record.name or "").startswith("django.task."):
            raise compat.TaskResultDoesNotExist(result_id)
        payload = record.payload
        task = import_string(payload["task"])
        if task.backend != self.alias:
            task = task.using(backend=self.alias)
        state = STATES.get(status.state, compat.TaskResultStatus.READY)
        if state in _FINISHED and record.finished_at is None:
            # The engine has finished it, the job log (the times) not yet: a moment more.
            state = compat.TaskResultStatus.RUNNING
        errors: list[compat.TaskError] = []
        outcome = status.result if isinstance(status.result, dict) else {}
        if state == compat.TaskResultStatus.SUCCESSFUL and "exception_class_path" in outcome:
            state = compat.TaskResultStatus.FAILED
            errors.append(compat.TaskError(
                exception_class_path=outcome["exception_class_path"],
                traceback=outcome["traceback"],
            ))  # fmt: skip
        elif state == compat.TaskResultStatus.FAILED:
            errors.append(compat.TaskError(
                exception_class_path=_class_path(record.error_class),
                traceback=record.error_traceback or status.error or "",
            ))  # fmt: skip
        started = record.started_at if state != compat.TaskResultStatus.READY else None
        finished = record.finished_at if state in _FINISHED else None
        result = compat.TaskResult(
            task=task, id=result_id, status=state, enqueued_at=record.enqueued_at,
            started_at=started, last_attempted_at=started, finished_at=finished,
            args=payload["args"], kwargs=payload["kwargs"], backend=self.alias,
            errors=errors, worker_ids=[f"jobyard:{status.engine}"] * max(status.attempts, 0),
        )  # fmt: skip
        if state == compat.TaskResultStatus.SUCCESSFUL:
            object.__setattr__(result, "_return_value", outcome.get("return_value"))
        return result


_FINISHED = (compat.TaskResultStatus.SUCCESSFUL, compat.TaskResultStatus.FAILED)


def _record(job_id: str) -> Any:
    """The job's row in the job log; this process's own unwritten events are written first."""
    from jobyard.job_engine.db import joblog

    writer = joblog.writer()
    if writer is not None:
        writer.flush()
    return get_job_record(job_id)


def _class_path(error_class: str | None) -> str:
    if error_class and "." in error_class:
        return error_class
    return f"builtins.{error_class}" if error_class else "jobyard.job_engine.errors.JobyardError"

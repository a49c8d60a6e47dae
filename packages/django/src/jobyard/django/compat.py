"""Django's task framework: `django.tasks` (Django 6+), else the `django-tasks` backport."""

from __future__ import annotations

from traceback import format_exception
from typing import Any

try:
    from django.tasks import exceptions as _exceptions
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import Task, TaskContext, TaskError, TaskResult, TaskResultStatus
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
except ImportError:
    from django_tasks import exceptions as _exceptions
    from django_tasks.backends.base import BaseTaskBackend
    from django_tasks.base import Task, TaskContext, TaskError, TaskResult, TaskResultStatus
    from django_tasks.signals import task_enqueued, task_finished, task_started
    from django_tasks.utils import normalize_json

# Named InvalidTaskError in Django 6 and django-tasks 0.12, InvalidTask before.
InvalidTask = getattr(_exceptions, "InvalidTaskError", None) or _exceptions.InvalidTask
TaskResultDoesNotExist = _exceptions.TaskResultDoesNotExist


def get_module_path(value: Any) -> str:
    return f"{value.__module__}.{value.__qualname__}"


def get_exception_traceback(exc: BaseException) -> str:
    return "".join(format_exception(exc))


__all__ = [
    "BaseTaskBackend",
    "InvalidTask",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskResult",
    "TaskResultDoesNotExist",
    "TaskResultStatus",
    "get_exception_traceback",
    "get_module_path",
    "normalize_json",
    "task_enqueued",
    "task_finished",
    "task_started",
]

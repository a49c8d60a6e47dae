"""Django tasks for tests/test_django.py, after Django's own tests/tasks/tasks.py."""

from __future__ import annotations

import json
import os

from jobyard.django.compat import task_finished, task_started

try:
    from django.tasks import task
except ImportError:
    from django_tasks import task

SIGNAL_LOG = "JOBYARD_TEST_DJANGO_SIGNALS"


@task
def noop_task(*args: object, **kwargs: object) -> None:
    return None


@task
async def noop_task_async(*args: object, **kwargs: object) -> None:
    return None


@task
def calculate_meaning_of_life() -> int:
    return 42


@task
def failing_task_value_error() -> None:
    raise ValueError("This task failed due to ValueError")


@task(queue_name="data-sync")
def echo(*args: object, **kwargs: object) -> dict:
    return {"args": list(args), "kwargs": kwargs}


@task(takes_context=True)
def get_task_id(context) -> str:
    return context.task_result.id


def _log_signal(name: str):
    def receiver(sender: type, task_result, **kwargs: object) -> None:
        if path := os.environ.get(SIGNAL_LOG):
            line = {"signal": name, "id": task_result.id, "status": str(task_result.status),
                    "sender": sender.__name__, "pid": os.getpid()}  # fmt: skip
            with open(path, "a") as out:
                out.write(json.dumps(line) + "\n")

    return receiver


# Workers send these; a test reads the file to see them.
_started, _finished = _log_signal("task_started"), _log_signal("task_finished")
task_started.connect(_started, weak=False)
task_finished.connect(_finished, weak=False)


@task
def mark(directory: str, key: str) -> None:
    """One line in `directory/key` per run (tests/test_transactional_dispatch.py counts them)."""
    with open(os.path.join(directory, key), "a") as f:
        f.write("ran\n")

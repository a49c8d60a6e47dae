"""Run Django tasks (`django.tasks` in Django 6, the `django-tasks` backport before) on jobyard.

    TASKS = {"default": {"BACKEND": "jobyard.django.JobyardBackend", "QUEUES": ["default"]}}

Workers (`jobyard worker`, `jobyard temporal-worker`) need `DJANGO_SETTINGS_MODULE` and the job
module `jobyard.django.jobs` (e.g. `jobyard worker jobyard.django.jobs`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["JobyardBackend"]


def __getattr__(name: str) -> Any:
    # Lazy, so that a worker importing jobyard.django.jobs does not import Django's task
    # framework before its settings are configured.
    if name == "JobyardBackend":
        from jobyard.django.backend import JobyardBackend

        return JobyardBackend
    raise AttributeError(name)

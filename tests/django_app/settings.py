"""A Django project whose tasks run on jobyard (tests/test_django.py)."""

import importlib.util

SECRET_KEY = "jobyard-tests"
USE_TZ = True
# The backport's app registers its signal logging; Django 6 has the framework built in.
INSTALLED_APPS = ["django_tasks"] if importlib.util.find_spec("django_tasks") else []
DATABASES: dict = {}
TASKS = {
    "default": {
        "BACKEND": "jobyard.django.JobyardBackend",
        "QUEUES": ["default", "data-sync"],
    }
}

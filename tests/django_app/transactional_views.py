"""Django views that enqueue inside `transaction.atomic()` with the transactional backend, on
Django's own connection to DATABASE_URL's database (SQLite or PostgreSQL); requests made with
Django's test client. `python -m tests.django_app.transactional_views <marker dir>` prints the
enqueued task ids as JSON: {"committed": id, "raised": id, "status": code of the raising view}.
Run in a process of its own: Django is configured here, unlike tests.django_app.settings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import django
from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.urls import path
from sqlalchemy.engine import make_url

from jobyard.job_engine.db import database_url

ENQUEUED: dict[str, Any] = {}


def databases() -> dict[str, Any]:
    url = make_url(database_url())
    if url.get_backend_name() == "sqlite":
        return {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": url.database}}
    return {"default": {
        "ENGINE": "django.db.backends.postgresql", "NAME": url.database, "USER": url.username,
        "PASSWORD": url.password or "", "HOST": url.host, "PORT": url.port or 5432,
    }}  # fmt: skip


def committing(request: HttpRequest) -> HttpResponse:
    from tests.django_app.tasks import mark

    with transaction.atomic():
        ENQUEUED["committed"] = mark.enqueue(sys.argv[1], "django-committed").id
    return HttpResponse("ok")


def raising(request: HttpRequest) -> HttpResponse:
    from tests.django_app.tasks import mark

    with transaction.atomic():
        ENQUEUED["raised"] = mark.enqueue(sys.argv[1], "django-raised").id
        raise RuntimeError("the view fails after enqueueing")


urlpatterns = [path("commit", committing), path("raise", raising)]


def main() -> None:
    settings.configure(
        SECRET_KEY="jobyard-tests", USE_TZ=True, ALLOWED_HOSTS=["*"], MIDDLEWARE=[],
        ROOT_URLCONF=__name__, DATABASES=databases(),
        INSTALLED_APPS=["django_tasks"] if importlib.util.find_spec("django_tasks") else [],
        TASKS={"default": {
            "BACKEND": "jobyard.django.JobyardBackend", "QUEUES": ["default", "data-sync"],
            "OPTIONS": {"transactional": True},
        }},
    )  # fmt: skip
    django.setup()
    from django.test import Client

    assert Client().get("/commit").status_code == 200
    status = Client(raise_request_exception=False).get("/raise").status_code
    print(json.dumps({**ENQUEUED, "status": status}))
    Path(sys.argv[1]).mkdir(exist_ok=True)


if __name__ == "__main__":
    main()

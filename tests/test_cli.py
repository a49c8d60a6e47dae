"""The `jobyard` console script as a user of a web app meets it: job modules found from the
project's directory and named on the command line, and one line (never a traceback) for bad
input and unavailable services."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobyard.dispatcher import JobStatus, get_job
from tests.engines import Engines
from tests.support import RedisServer, free_port, start_engines_patiently, wait_for

JOBYARD = str(Path(sys.executable).parent / "jobyard")

JOBS_MODULE = """
from pydantic import BaseModel
from jobyard.job_engine import job


class Greeting(BaseModel):
    name: str


def greet(name: str) -> str:
    return f"hello {name}"


@job("myapp.greet", queue="default", payload=Greeting)
async def greet_job(ctx, payload: Greeting):
    return await ctx.run("greet", greet, payload.name)
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A web project's directory: myapp/jobs.py, nothing installed, not on PYTHONPATH."""
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "jobs.py").write_text(textwrap.dedent(JOBS_MODULE))
    (tmp_path / "myapp" / "broken.py").write_text("import json\n\nraise RuntimeError('boom')\n")
    return tmp_path


@pytest.fixture
def user_env(jobyard_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JOBYARD_JOB_MODULES")}
    return env


def jobyard(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JOBYARD, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=90
    )


def start(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    log = cwd / f"{args[0]}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([JOBYARD, *args], env=env, cwd=cwd, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


@pytest.mark.timeout(400)
def test_job_modules_come_from_the_project_directory_and_the_command_line(
    project: Path, user_env: dict[str, str], redis_server: RedisServer
) -> None:
    worker, worker_log = start(["worker", "myapp.jobs", "--processes", "1"], user_env, project)
    temporal, temporal_log = start(["temporal-worker", "myapp.jobs"], user_env, project)
    try:
        probe = Engines(redis_server)

        def worker_live() -> bool:
            assert worker.poll() is None, worker_log.read_text()
            return probe.live_workers("default") > 0

        def temporal_polling() -> bool:
            assert temporal.poll() is None, temporal_log.read_text()
            return "Temporal worker polling" in temporal_log.read_text()

        wait_for(worker_live, timeout=150)
        wait_for(temporal_polling, timeout=150)
        for engine, extra_env in (("dramatiq", {}), ("temporal", {"USE_DRAMATIQ": "false"})):
            done = jobyard("dispatch", "myapp.greet", "--modules", "myapp.jobs", "--payload",
                           json.dumps({"name": engine}), env={**user_env, **extra_env},
                           cwd=project)  # fmt: skip
            assert done.returncode == 0, done.stderr
            handle = json.loads(done.stdout)
            assert handle["engine"] == engine

            def finished(job_id: str = handle["job_id"]) -> JobStatus | None:
                status = get_job(job_id)
                return status if status.state in ("succeeded", "failed", "dead") else None

            status = wait_for(finished, timeout=60, interval=0.1)
            assert (status.state, status.result) == ("succeeded", f"hello {engine}")
    finally:
        stop(worker)
        stop(temporal)


@pytest.mark.parametrize(
    ("args", "env_update", "code", "reason"),
    [
        (["dispatch", "myapp.greet", "--modules", "myapp.nope"], {}, 2,
         "job module 'myapp.nope' not found"),
        (["worker", "nosuch.jobs"], {}, 2, "job module 'nosuch.jobs' not found"),
        (["temporal-worker"], {"JOBYARD_JOB_MODULES": "myapp.broken"}, 2,
         "job module 'myapp.broken' failed to import: RuntimeError: boom (" ),
        (["dispatch", "system.echo", "--payload", "[" * 5000 + "]" * 5000], {}, 2,
         "--payload is nested too deeply"),
        (["dead", "list"], {"DATABASE_URL": "postgresql://postgres@127.0.0.1:{closed}/x"}, 3,
         "is unavailable: connection failed"),
        (["dead", "show", "x"], {"DATABASE_URL": "sqlite:///{tmp}/empty.db"}, 3,
         "is not migrated (no such table: job_log): run `jobyard db upgrade`"),
    ],
)  # fmt: skip
def test_errors_are_one_line(
    project: Path,
    user_env: dict[str, str],
    args: list[str],
    env_update: dict[str, str],
    code: int,
    reason: str,
) -> None:
    env = {**user_env}
    for key, value in env_update.items():
        env[key] = value.format(closed=free_port(), tmp=project)
    done = jobyard(*args, env=env, cwd=project)
    assert done.returncode == code, done.stderr
    assert done.stderr.count("\n") == 1 and reason in done.stderr, done.stderr
    assert "Traceback" not in done.stdout + done.stderr


#: What a process that did not exit cleanly leaves on stderr: a Rust panic in a native thread
#: (the Temporal client's tokio runtime), an abort, a crash in interpreter finalisation.
UNCLEAN = ("panicked", "Aborted", "Fatal Python error", "Traceback", "core dumped")


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "runs", [pytest.param(10, id="ten"), pytest.param(50, id="fifty", marks=pytest.mark.slow)]
)
def test_commands_exit_cleanly_many_times_each(
    engines: Engines, user_env: dict[str, str], project: Path, runs: int
) -> None:
    """`jobyard dispatch` and `jobyard status`, `runs` real processes each, on both engines (a
    Temporal client alive at exit used to panic in 4 runs of 20, issue 14 item 7; fifty each
    in `make test-slow`)."""
    start_engines_patiently(engines, queues="default", temporal=True)
    # A built-in job, which the workers (started with the test's modules) know too.
    env = {**user_env, "JOBYARD_JOB_MODULES": "myapp.jobs"}
    engines_env = [env, {**env, "USE_DRAMATIQ": "false"}]

    def run(args: list[str], run_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return jobyard(*args, env=run_env, cwd=project)

    # Side by side, a few at a time: most of each run is its interpreter starting.
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        dispatches = list(pool.map(
            lambda i: run(["dispatch", "system.echo", "--payload", json.dumps({"i": i})],
                          engines_env[i % 2]),
            range(runs),
        ))  # fmt: skip
        handles = [json.loads(d.stdout) for d in dispatches if d.returncode == 0]
        assert len(handles) == runs, [d.stderr for d in dispatches if d.returncode != 0]
        assert {h["engine"] for h in handles} == {"dramatiq", "temporal"}
        statuses = list(pool.map(lambda h: run(["status", h["job_id"]], env), handles))
    unclean = [
        (p.args[1:3], p.returncode, p.stderr[-2000:])
        for p in dispatches + statuses
        if p.returncode != 0 or any(marker in p.stderr for marker in UNCLEAN)
    ]
    assert not unclean, f"{len(unclean)} of {2 * runs} runs did not exit cleanly: {unclean[:3]}"
    assert {json.loads(s.stdout)["job_id"] for s in statuses} == {h["job_id"] for h in handles}

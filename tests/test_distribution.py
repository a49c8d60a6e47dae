"""The `jobyard` distribution: the wheel the root pyproject.toml builds from the workspace
members, installed into clean virtualenvs (the core, and `[all]`) and run from there: a Dramatiq
worker, the Temporal worker, dispatch, and the HTTP API.

The installs use uv's cache and the versions in uv.lock (as constraints), so the module takes
seconds once the cache is warm; the install sizes are printed in pytest's summary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.engines import Engines
from tests.otlp import OtlpReceiver
from tests.support import ROOT, RedisServer, free_port, wait_for

pytestmark = pytest.mark.timeout(180)

API_TOKEN = "distribution-test-token"
EXTRAS_ONLY = ("fastapi", "uvicorn", "google.genai", "django", "opentelemetry.sdk")


def uv() -> list[str]:
    """uv: `uv run` says where it is in $UV; CI has it on PATH; `make` has `python3 -m uv`."""
    if os.environ.get("UV"):
        return [os.environ["UV"]]
    if shutil.which("uv"):
        return ["uv"]
    for python in ("python3", sys.executable):
        if subprocess.run([python, "-m", "uv", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "uv"]
    pytest.fail("uv is needed to build and install the wheel (make setup installs it)")


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


@dataclass
class Install:
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def site_packages(self) -> Path:
        return next(self.venv.glob("lib/python3.*/site-packages"))

    def size_mb(self) -> float:
        files = (
            p
            for p in self.site_packages.rglob("*")
            if p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts
        )  # the installed files; not the bytecode its commands write as they run
        return sum(p.stat().st_size for p in files) / 1e6

    def packages(self) -> int:
        return len(list(self.site_packages.glob("*.dist-info")))

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """The environment of a user of this virtualenv: nothing from the checkout."""
        # PYTHONDONTWRITEBYTECODE goes too (a user's Python writes it; the installs are not
        # compiled): each command would otherwise compile every module it imports, seconds each.
        dropped = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
        env = {k: v for k, v in base.items() if k not in dropped}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env.pop("JOBYARD_JOB_MODULES", None)  # tests.jobs lives in the checkout
        return env


@dataclass
class Distribution:
    wheel: Path
    core: Install
    full: Install


@pytest.fixture(scope="module")
def distribution(tmp_path_factory: pytest.TempPathFactory) -> Distribution:
    work = tmp_path_factory.mktemp("distribution")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    run([*uv(), "build", "--wheel", "--out-dir", str(work / "dist"), str(ROOT)], env=env)
    (wheel,) = (work / "dist").glob("jobyard-*.whl")
    constraints = work / "constraints.txt"
    run([*uv(), "export", "--frozen", "--no-hashes", "--all-extras", "--no-dev",
         "--no-emit-workspace", "--no-emit-project", "-o", str(constraints)],
        cwd=ROOT, env=env)  # fmt: skip
    installs = {}
    for name, requirement in (("core", str(wheel)), ("all", f"{wheel}[all]")):
        venv = work / name
        run([*uv(), "venv", "--quiet", "--python", sys.executable, str(venv)], env=env)
        run([*uv(), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
             "--constraint", str(constraints), requirement], env=env)  # fmt: skip
        installs[name] = Install(venv)
    return Distribution(wheel, installs["core"], installs["all"])


def member_dirs() -> list[Path]:
    return sorted(
        p.parent for p in ROOT.glob("*/*/pyproject.toml") if p.parts[-3] in ("packages", "apps")
    )


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_wheel_assembles_every_member(distribution: Distribution) -> None:
    names = set(zipfile.ZipFile(distribution.wheel).namelist())
    for member in member_dirs():
        for package in (member / "src" / "jobyard").iterdir():
            if package.is_dir() and package.name != "__pycache__":
                assert f"jobyard/{package.name}/__init__.py" in names, package
    # The files that are not Python: Lua, migrations, templates, the dashboard.
    for data in ("jobyard/queue/jobyard.lua", "jobyard/api/dashboard.html",
                 "jobyard/job_engine/db/migrations/script.py.mako",
                 "jobyard/job_engine/templates/email/welcome.txt.j2"):  # fmt: skip
        assert data in names


def test_every_member_library_is_declared_by_the_distribution() -> None:
    """A member's dependency missing from the root pyproject would work in the workspace and
    fail in a pip install."""
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {requirement_name(r) for r in root["dependencies"]}
    for extra in root["optional-dependencies"].values():
        declared |= {requirement_name(r) for r in extra}
    for member in member_dirs():
        project = tomllib.loads((member / "pyproject.toml").read_text())["project"]
        for requirement in project["dependencies"]:
            name = requirement_name(requirement)
            if not name.startswith("jobyard-"):
                assert name in declared, f"{member.name} needs {name}; root does not declare it"


WAIT_FOR_JOBS = """
import json, sys, time
import jobyard.dispatcher
from jobyard.dispatcher import get_job

def final(job_id):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = get_job(job_id)
        if status.state in ("succeeded", "failed", "dead"):
            break
        time.sleep(0.1)
    return status.as_dict()

print(json.dumps({"file": jobyard.dispatcher.__file__,
                  "jobs": [final(job_id) for job_id in sys.argv[1:]]}, default=str))
"""


def _wait_for_jobs(install: Install, env: dict[str, str], *job_ids: str) -> dict:
    """get_job() from the installed library, as a web app would call it."""
    cmd = [str(install.bin / "python"), "-c", WAIT_FOR_JOBS, *job_ids]
    return json.loads(run(cmd, env=env, cwd=install.venv).stdout)


def _dispatch(install: Install, env: dict[str, str], payload: dict) -> subprocess.Popen:
    """`jobyard dispatch` from the installed console script (started: they run side by side)."""
    cmd = [
        str(install.bin / "jobyard"),
        "dispatch",
        "system.echo",
        "--payload",
        json.dumps(payload),
    ]
    return subprocess.Popen(cmd, env=env, cwd=install.venv, stdout=subprocess.PIPE, text=True)


def _handle(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return json.loads(out)


class Started:
    """jobyard commands from an installed virtualenv, stopped at the end of the test."""

    def __init__(self, install: Install, env: dict[str, str]) -> None:
        self.install, self.env = install, env
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, *args: str) -> tuple[subprocess.Popen, Path]:
        log = self.install.venv / f"{args[0]}-{len(self.procs)}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen([str(self.install.bin / "jobyard"), *args], env=self.env,
                                    cwd=self.install.venv, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        self.procs.append((proc, log))
        return proc, log

    def stop(self) -> None:
        for proc, _ in self.procs:
            proc.terminate()
        for proc, log in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                pytest.fail(f"{proc.args} did not stop on SIGTERM:\n{log.read_text()}")


@pytest.fixture
def started(jobyard_env: dict[str, str]) -> Iterator[list[Started]]:
    runs: list[Started] = []
    yield runs
    for r in runs:
        r.stop()


def _wait_for_output(started: tuple[subprocess.Popen, Path], text: str) -> None:
    proc, log = started

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        return text in log.read_text()

    wait_for(ready, timeout=60)


def _wait_for_worker(started: tuple[subprocess.Popen, Path], redis_server: RedisServer) -> None:
    proc, log = started
    probe = Engines(redis_server)

    def live() -> bool:
        assert proc.poll() is None, log.read_text()
        return probe.live_workers("default") > 0

    wait_for(live, timeout=60)


def test_the_core_install_is_light_and_runs_both_engines(
    distribution: Distribution,
    redis_server: RedisServer,
    started: list[Started],
    record_property: pytest.RecordProperty,
) -> None:
    core, full = distribution.core, distribution.full
    env = core.env(dict(os.environ))
    run_core = Started(core, env)
    started.append(run_core)
    # Started first, side by side: most of this test is their interpreters starting.
    worker = run_core.start("worker", "--queues", "default", "--processes", "1")
    temporal_worker = run_core.start("temporal-worker")
    record_property(
        "summary",
        f"jobyard install sizes: core {core.size_mb():.0f} MB, {core.packages()} packages; "
        f"[all] {full.size_mb():.0f} MB, {full.packages()} packages",
    )
    probe = (
        "import importlib.util as u, sys\n"
        "print([m for m in sys.argv[1:] if u.find_spec(m.split('.')[0]) and u.find_spec(m)])"
    )
    found = run([str(core.bin / "python"), "-c", probe, *EXTRAS_ONLY], env=env).stdout
    assert found.strip() == "[]", f"the core install pulled in extras: {found}"
    # Without the api extra, `jobyard api` says what to install, in one line.
    api = subprocess.run([str(core.bin / "jobyard"), "api"], env=env, capture_output=True,
                         text=True, cwd=core.venv, timeout=60)  # fmt: skip
    assert api.returncode == 2 and api.stderr.count("\n") == 1, api.stderr
    assert "jobyard[api]" in api.stderr

    _wait_for_worker(worker, redis_server)
    _wait_for_output(temporal_worker, "Temporal worker polling")
    # An OTLP endpoint without the [otel] extra: one line saying what to install, no traces.
    untraced = subprocess.run(
        [str(core.bin / "jobyard"), "dispatch", "system.echo", "--payload", "{}"],
        env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
        capture_output=True, text=True, cwd=core.venv, timeout=60,
    )  # fmt: skip
    assert untraced.returncode == 0, untraced.stderr
    assert untraced.stderr.count("Install jobyard[otel]") == 1, untraced.stderr
    on_dramatiq = _dispatch(core, env, {"on": "dramatiq"})
    on_temporal = _dispatch(core, {**env, "USE_DRAMATIQ": "false"}, {"on": "temporal"})
    handles = [_handle(on_dramatiq), _handle(on_temporal)]
    assert [h["engine"] for h in handles] == ["dramatiq", "temporal"]
    seen = _wait_for_jobs(core, env, *(h["job_id"] for h in handles))
    assert seen["file"].startswith(str(core.venv)), seen  # the wheel's code, not the checkout's
    assert [(s["engine"], s["state"], s["result"]) for s in seen["jobs"]] == [
        ("dramatiq", "succeeded", {"on": "dramatiq"}),
        ("temporal", "succeeded", {"on": "temporal"}),
    ], seen


def test_the_all_install_serves_the_api(
    distribution: Distribution, redis_server: RedisServer, started: list[Started]
) -> None:
    full = distribution.full
    env = full.env(dict(os.environ))
    env.update({"JOBYARD_API_TOKEN": API_TOKEN, "JOBYARD_ADMIN_TOKEN": API_TOKEN})
    # [otel] traces with what it installs: the dispatch and the worker export to a receiver.
    receiver = OtlpReceiver().start()
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    run_all = Started(full, env)
    started.append(run_all)
    port = free_port()
    worker = run_all.start("worker", "--queues", "default", "--processes", "1")
    api = run_all.start("api", "--port", str(port))
    run([str(full.bin / "python"), "-c", f"import {', '.join(EXTRAS_ONLY)}"], env=env)
    _wait_for_worker(worker, redis_server)
    _wait_for_output(api, f"Uvicorn running on http://127.0.0.1:{port}")
    handle = _handle(_dispatch(full, env, {"via": "all"}))
    url = f"http://127.0.0.1:{port}/jobs/{handle['job_id']}"
    headers = {"Authorization": f"Bearer {API_TOKEN}"}

    def finished() -> dict | None:
        job = httpx.get(url, headers=headers, timeout=5).json()
        return job if job.get("state") == "succeeded" else None

    assert wait_for(finished, timeout=30)["result"] == {"via": "all"}

    def traced() -> set[str]:
        with receiver.lock:
            return {s.name for s in receiver.spans if s.job_id == handle["job_id"]}

    try:
        wait_for(lambda: {"jobyard.dispatch", "jobyard.run"} <= traced(), timeout=30)
    finally:
        receiver.stop()

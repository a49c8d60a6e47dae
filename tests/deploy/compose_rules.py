"""What docker/compose.yaml must get right, as a function the tests can also feed broken
copies to (so a rule that never fires would be noticed).

Checks run on the file as compose would see it: YAML anchors and merge keys resolved
(PyYAML does that), `${VAR:-default}` interpolation applied for a given environment.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from collections.abc import Mapping
from functools import cache
from typing import Any

import jsonschema

from jobyard.job_engine import env

# Services that run once and exit (compose `restart: "no"`); all others run forever.
ONE_SHOT_RESTART_POLICY = "no"

_INTERPOLATION = re.compile(
    r"""\$(?:
        (?P<escaped>\$)
      | \{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}
      | (?P<named>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}

# image[:tag][@digest]; the tag is everything after the last colon that follows the
# last slash (a registry host may carry a port: host:5000/name:tag).
_IMAGE = re.compile(
    r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_VERSION_TAG = re.compile(r"^v?\d+(\.\d+)+")


class InterpolationError(ValueError):
    """A `${VAR:?message}` whose variable is unset, as `docker compose` would refuse."""


@cache
def compose_schema() -> dict[str, Any]:
    """The Compose Specification JSON schema, as vendored by check-jsonschema (a dev
    dependency pinned in uv.lock): no network, no copy of our own to keep in sync."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def schema_errors(compose: Mapping[str, Any]) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema)
    return [
        f"schema: {error.json_path}: {error.message}"
        for error in sorted(validator.iter_errors(compose), key=lambda e: e.json_path)
    ]


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Apply compose variable interpolation to every string in a loaded compose file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda match: _substitute(match, env), value)
    return value


def _substitute(match: re.Match[str], env: Mapping[str, str]) -> str:
    if match["escaped"]:
        return "$"
    name = match["braced"] or match["named"]
    op, arg = match["op"], match["arg"] or ""
    is_set = name in env
    is_non_empty = bool(env.get(name))
    present = is_non_empty if op and op.startswith(":") else is_set
    if op in (":-", "-"):
        return env[name] if present else arg
    if op in (":?", "?"):
        if not present:
            raise InterpolationError(f"{name}: {arg}")
        return env[name]
    if op in (":+", "+"):
        return arg if present else ""
    return env.get(name, "")


def duration_seconds(value: str | int | float) -> float:
    """Seconds in a compose duration such as `45s`, `1m30s` or `1500ms`."""
    if isinstance(value, int | float):
        return float(value)
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        raise ValueError(f"not a compose duration: {value!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def is_one_shot(service: Mapping[str, Any]) -> bool:
    return str(service.get("restart", "")) == ONE_SHOT_RESTART_POLICY


def long_running_services(compose: Mapping[str, Any]) -> dict[str, Any]:
    return {name: svc for name, svc in compose["services"].items() if not is_one_shot(svc)}


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.partition("=")[::2] for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def compose_problems(raw: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """Everything wrong with a loaded compose file, for the given host environment."""
    problems = schema_errors(raw)
    try:
        compose = interpolate(copy.deepcopy(dict(raw)), env)
    except InterpolationError as exc:
        return [*problems, f"interpolation: {exc}"]
    services: dict[str, Any] = compose.get("services") or {}
    for name in ("redis", "postgres", "temporal", "worker", "temporal-worker", "migrate"):
        if name not in services:
            problems.append(f"{name}: service missing")
    if problems:
        return problems

    problems += _redis_persistence_problems(raw["services"]["redis"], services["redis"])
    if "api" in raw["services"]:
        problems += _api_token_problems(raw["services"]["api"])
    problems += _worker_replica_problems(raw["services"]["worker"])
    for name, service in services.items():
        problems += _image_problems(name, service)
        problems += _depends_on_problems(name, service, services)
        if is_one_shot(service):
            continue
        problems += _healthcheck_problems(name, service)
        problems += _grace_problems(name, service)
    return problems


def _redis_persistence_problems(
    raw_redis: Mapping[str, Any], redis: Mapping[str, Any]
) -> list[str]:
    problems = []
    command = redis.get("command") or []
    words = command.split() if isinstance(command, str) else [str(word) for word in command]
    if not any(words[i : i + 2] == ["--appendonly", "yes"] for i in range(len(words) - 1)):
        problems.append("redis: AOF persistence is off (command lacks `--appendonly yes`)")
    data_volumes = [v for v in raw_redis.get("volumes") or [] if _volume_target(v) == "/data"]
    if not data_volumes:
        problems.append("redis: /data (where the AOF lives) is not on a volume")
    return problems


def _volume_target(volume: str | Mapping[str, Any]) -> str | None:
    """Container path of a short (`source:target[:mode]`) or long volume entry."""
    if isinstance(volume, Mapping):
        return volume.get("target")
    parts = volume.split(":")
    return parts[1] if len(parts) >= 2 else parts[0]


def _worker_replica_problems(raw_worker: Mapping[str, Any]) -> list[str]:
    replicas = (raw_worker.get("deploy") or {}).get("replicas")
    if not isinstance(replicas, str) or not re.fullmatch(r"\$\{WORKER_REPLICAS:-1\}", replicas):
        return [f"worker: deploy.replicas must be ${{WORKER_REPLICAS:-1}}, is {replicas!r}"]
    return []


def _image_problems(name: str, service: Mapping[str, Any]) -> list[str]:
    image = service.get("image")
    if not image:
        return [f"{name}: no image (every service needs a pinned image)"]
    match = _IMAGE.match(image)
    if not match or not (match["tag"] or match["digest"]):
        return [f"{name}: image {image!r} has no tag"]
    if match["tag"] == "latest":
        return [f"{name}: image {image!r} uses the moving tag `latest`"]
    if "build" not in service and not (match["digest"] or _VERSION_TAG.match(match["tag"] or "")):
        return [f"{name}: image {image!r} is not pinned to a version"]
    return []


def _depends_on_problems(
    name: str, service: Mapping[str, Any], services: Mapping[str, Any]
) -> list[str]:
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):
        return [f"{name}: depends_on must name a condition per dependency, not a list"]
    problems = []
    for dependency, options in depends_on.items():
        target = services.get(dependency)
        if target is None:
            problems.append(f"{name}: depends on unknown service {dependency!r}")
            continue
        expected = "service_completed_successfully" if is_one_shot(target) else "service_healthy"
        condition = (options or {}).get("condition")
        if condition != expected:
            problems.append(f"{name}: depends_on.{dependency} must be {expected}, is {condition!r}")
    return problems


def _healthcheck_problems(name: str, service: Mapping[str, Any]) -> list[str]:
    healthcheck = service.get("healthcheck") or {}
    if healthcheck.get("disable") or not healthcheck.get("test"):
        return [f"{name}: long-running service without a health check"]
    test = healthcheck["test"]
    if isinstance(test, list) and test[:1] == ["NONE"]:
        return [f"{name}: health check disabled with NONE"]
    return []


def _grace_problems(name: str, service: Mapping[str, Any]) -> list[str]:
    grace = environment_of(service).get("WORKER_SHUTDOWN_GRACE")
    if grace is None:
        return []
    if not grace.isdigit():
        return [f"{name}: WORKER_SHUTDOWN_GRACE must be whole seconds, is {grace!r}"]
    stop_grace_period = service.get("stop_grace_period")
    if stop_grace_period is None:
        return [f"{name}: no stop_grace_period (Docker's 10s default kills jobs mid-flight)"]
    if duration_seconds(stop_grace_period) <= int(grace):
        return [
            f"{name}: stop_grace_period {stop_grace_period} must exceed "
            f"WORKER_SHUTDOWN_GRACE={grace}s, or jobs are SIGKILLed mid-flight"
        ]
    return []


#: What the API reads its bearer tokens from: closed without them.
API_TOKENS = (env.API_TOKEN, env.ADMIN_TOKEN)


def _api_token_problems(raw_api: Mapping[str, Any]) -> list[str]:
    """The API must get its tokens from the host (docker/.env, the deploy's secrets): without
    them it answers 401 to everything, and a token written into the file would be committed."""
    environment = environment_of(raw_api)
    problems = []
    for name in API_TOKENS:
        value = environment.get(name)
        if value is None:
            problems.append(f"api: {name} is not passed (the API stays closed without it)")
        elif not re.fullmatch(rf"\$\{{{name}(:?-)?\}}", value):
            problems.append(f"api: {name} must come from the host as ${{{name}:-}}, is {value!r}")
    return problems

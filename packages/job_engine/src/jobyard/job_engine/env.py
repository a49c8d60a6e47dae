"""Every environment variable jobyard reads, with its default, in one place."""

from __future__ import annotations

import os

REDIS_URL = "REDIS_URL"
REDIS_TIMEOUT = "REDIS_TIMEOUT"  # seconds; connect and read timeout of the web-side client
WORKER_REDIS_TIMEOUT = "WORKER_REDIS_TIMEOUT"  # seconds; the worker-side client
DATABASE_URL = "DATABASE_URL"
TEMPORAL_ADDRESS = "TEMPORAL_ADDRESS"
TEMPORAL_NAMESPACE = "TEMPORAL_NAMESPACE"
TEMPORAL_TASK_QUEUE = "TEMPORAL_TASK_QUEUE"
TEMPORAL_START_TIMEOUT = "TEMPORAL_START_TIMEOUT"  # seconds for one workflow start RPC
USE_DRAMATIQ = "USE_DRAMATIQ"
WORKER_HEARTBEAT_INTERVAL = "WORKER_HEARTBEAT_INTERVAL"  # seconds
WORKER_HEARTBEAT_TIMEOUT = "WORKER_HEARTBEAT_TIMEOUT"  # seconds without a beat = dead worker
WORKER_SHUTDOWN_GRACE = "WORKER_SHUTDOWN_GRACE"  # seconds in-flight jobs get on SIGTERM
WORKER_PROCESSES = "WORKER_PROCESSES"
WORKER_REPLICAS = "WORKER_REPLICAS"  # read by compose/deploy, not by Python
WEBHOOK_SECRET = "WEBHOOK_SECRET"
JOB_MODULES = "JOBYARD_JOB_MODULES"
BREAKER_PROBE_INTERVAL = "JOBYARD_BREAKER_PROBE_INTERVAL"  # seconds between Redis probes when open
# Per-queue: WORKER_CONCURRENCY_<QUEUE>, QUEUE_TIME_LIMIT_<QUEUE>, QUEUE_MAX_RETRIES_<QUEUE>
# Per-job: JOBYARD_JOB_<NAME>_ATTEMPTS|BACKOFF|TIMEOUT (see jobyard.job_engine.policy.env_key)

DEFAULTS: dict[str, str] = {
    REDIS_URL: "redis://127.0.0.1:6379/0",
    REDIS_TIMEOUT: "0.2",
    WORKER_REDIS_TIMEOUT: "5",
    TEMPORAL_ADDRESS: "127.0.0.1:7233",
    TEMPORAL_NAMESPACE: "default",
    TEMPORAL_TASK_QUEUE: "jobyard",
    TEMPORAL_START_TIMEOUT: "2",
    USE_DRAMATIQ: "true",
    WORKER_HEARTBEAT_INTERVAL: "2",
    WORKER_HEARTBEAT_TIMEOUT: "10",
    WORKER_SHUTDOWN_GRACE: "30",
    WORKER_PROCESSES: "2",
    BREAKER_PROBE_INTERVAL: "0.5",
}


def get(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return DEFAULTS.get(name, default)
    return value


def get_str(name: str) -> str:
    value = get(name)
    if value is None:
        raise KeyError(f"environment variable {name} is not set")
    return value


def get_float(name: str, default: float | None = None) -> float:
    raw = get(name)
    if raw is None:
        if default is None:
            raise KeyError(f"environment variable {name} is not set")
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def get_int(name: str, default: int | None = None) -> int:
    raw = get(name)
    if raw is None:
        if default is None:
            raise KeyError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def get_bool(name: str) -> bool:
    raw = (get(name) or "").strip().lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use true or false)")

"""Every environment variable jobyard reads, with its default, in one place."""

from __future__ import annotations

import os
from typing import Any

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
# Per-queue (see jobyard.job_engine.queues): WORKER_CONCURRENCY_<QUEUE>, WORKER_PREFETCH_<QUEUE>,
# QUEUE_TIME_LIMIT_<QUEUE>, QUEUE_MAX_ATTEMPTS_<QUEUE>
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


def _number(name: str, cast: type, default: float | None, kind: str) -> Any:
    raw = get(name)
    if raw is None:
        if default is None:
            raise KeyError(f"environment variable {name} is not set")
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {kind}") from None


def get_float(name: str, default: float | None = None) -> float:
    value: float = _number(name, float, default, "a number")
    return value


def get_int(name: str, default: int | None = None) -> int:
    value: int = _number(name, int, default, "an integer")
    return value


def get_bool(name: str) -> bool:
    raw = (get(name) or "").strip().lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use true or false)")


# --- ai.generate (Google Gemini through google-genai) ---
GEMINI_API_KEY = "GEMINI_API_KEY"  # required by ai.generate (checked at dispatch)
GEMINI_MODEL = "GEMINI_MODEL"  # default model when the payload names none
GEMINI_BASE_URL = "GEMINI_BASE_URL"  # optional; another endpoint speaking the Gemini REST API
GEMINI_TIMEOUT = "GEMINI_TIMEOUT"  # seconds for one generateContent request
GEMINI_RATE_LIMIT = "GEMINI_RATE_LIMIT"  # calls per GEMINI_RATE_PERIOD, across every worker
GEMINI_RATE_PERIOD = "GEMINI_RATE_PERIOD"  # seconds; the rate-limit window
GEMINI_DAILY_LIMIT = "GEMINI_DAILY_LIMIT"  # calls per UTC day, across every worker
# --- email.send (SMTP) ---
SMTP_HOST = "SMTP_HOST"  # required by email.send
SMTP_PORT = "SMTP_PORT"
SMTP_STARTTLS = "SMTP_STARTTLS"  # true: upgrade the connection with STARTTLS (required then)
SMTP_USERNAME = "SMTP_USERNAME"  # optional; log in when set
SMTP_PASSWORD = "SMTP_PASSWORD"
SMTP_FROM = "SMTP_FROM"  # required by email.send: the From address, e.g. "Jobyard <no-reply@x>"
SMTP_TIMEOUT = "SMTP_TIMEOUT"  # seconds for connect and each SMTP command
# --- document.convert (LibreOffice) ---
STORAGE_ROOT = "JOBYARD_STORAGE_ROOT"  # required by document.convert; paths are relative to it
SOFFICE_PATH = "JOBYARD_SOFFICE"  # optional; the soffice binary (default: found on PATH)

DEFAULTS.update(
    {
        GEMINI_MODEL: "gemini-2.0-flash",
        GEMINI_TIMEOUT: "20",
        GEMINI_RATE_LIMIT: "60",
        GEMINI_RATE_PERIOD: "60",
        GEMINI_DAILY_LIMIT: "1333",
        SMTP_PORT: "25",
        SMTP_STARTTLS: "false",
        SMTP_TIMEOUT: "20",
    }
)

# Job catalogue: maintenance and analytics jobs.
TEMP_DIR = "JOBYARD_TEMP_DIR"  # root under which maintenance.file_cleanup deletes old files
REPORT_RECIPIENTS = "JOBYARD_REPORT_RECIPIENTS"  # comma-separated addresses of analytics reports

# The job log (jobyard.job_engine.db.joblog)
JOB_LOG = "JOBYARD_JOB_LOG"  # "false" switches the database job log off
JOB_LOG_INTERVAL = "JOBYARD_JOB_LOG_INTERVAL"  # seconds between batched writes
# Beyond this many unwritten job log events (the database down), dispatch_job without a
# `connection=` refuses (JobLogBacklogError) rather than start jobs the log may never hear of.
JOB_LOG_DISPATCH_LIMIT = "JOBYARD_JOB_LOG_DISPATCH_LIMIT"
DEFAULTS[JOB_LOG] = "true"
DEFAULTS[JOB_LOG_INTERVAL] = "0.5"
DEFAULTS[JOB_LOG_DISPATCH_LIMIT] = "100000"

# Dispatch in a transaction (jobyard.dispatcher.transactional, jobyard.dispatcher.relay): the
# relay in every `jobyard worker` and `jobyard temporal-worker` that sends committed outbox rows.
DISPATCH_RELAY = "JOBYARD_DISPATCH_RELAY"  # "false": this process runs no relay
DISPATCH_RELAY_BATCH = "JOBYARD_DISPATCH_RELAY_BATCH"  # outbox rows one relay pass sends at most
DISPATCH_RELAY_POLL = "JOBYARD_DISPATCH_RELAY_POLL"  # seconds between looks (PostgreSQL: NOTIFY)
DEFAULTS.update({DISPATCH_RELAY: "true", DISPATCH_RELAY_BATCH: "1000", DISPATCH_RELAY_POLL: "0.02"})

# The HTTP API (jobyard.api). Closed by default: with no token set, every route but GET /health
# answers 401; each setting below opens something, none closes it.
ADMIN_TOKEN = "JOBYARD_ADMIN_TOKEN"  # comma-separated bearer tokens that may do everything
API_TOKEN = "JOBYARD_API_TOKEN"  # comma-separated bearer tokens that may dispatch and read
ALLOWED_ORIGINS = "JOBYARD_ALLOWED_ORIGINS"  # comma-separated Origins besides the API's own
ALLOWED_HOSTS = "JOBYARD_ALLOWED_HOSTS"  # comma-separated Host names; unset = any Host
MAX_REQUEST_BYTES = "JOBYARD_MAX_REQUEST_BYTES"  # largest HTTP request body the API reads
DEFAULTS[MAX_REQUEST_BYTES] = str(1024 * 1024)

# Limits and outbound requests (jobyard.job_engine.registry, jobyard.job_engine.netguard)
MAX_PAYLOAD_BYTES = "JOBYARD_MAX_PAYLOAD_BYTES"  # largest payload (as compact JSON) dispatched
DEFAULTS[MAX_PAYLOAD_BYTES] = str(512 * 1024)
WEBHOOK_ALLOW = "JOBYARD_WEBHOOK_ALLOW"  # comma-separated hosts or CIDRs webhooks may reach
# although private (loopback, RFC 1918, ...); unset = public addresses only

# Metrics
WORKER_METRICS_PORT = "WORKER_METRICS_PORT"  # `jobyard worker` serves /metrics here; 0 = off
WORKER_METRICS_HOST = "WORKER_METRICS_HOST"  # address the worker's /metrics binds to
DEFAULTS[WORKER_METRICS_HOST] = "127.0.0.1"
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's; set for workers
DEFAULTS[WORKER_METRICS_PORT] = "9191"
# `jobyard temporal-worker` serves /metrics here (on WORKER_METRICS_HOST); 0 = off
TEMPORAL_WORKER_METRICS_PORT = "TEMPORAL_WORKER_METRICS_PORT"
DEFAULTS[TEMPORAL_WORKER_METRICS_PORT] = "9192"

# Activity slots of `jobyard temporal-worker`'s main task queue: the claims, and steps that
# workflows scheduled there before each queue's steps had a task queue of their own (a queue's
# steps run with its concurrency as slots, WORKER_CONCURRENCY_<QUEUE>), each with a thread
TEMPORAL_STEP_CONCURRENCY = "TEMPORAL_STEP_CONCURRENCY"
DEFAULTS[TEMPORAL_STEP_CONCURRENCY] = "100"

# "false": a step's result is not also kept in the database's job_steps: on Dramatiq it is then in
# Redis only (a Redis that comes back empty runs returned steps again), and on Temporal a step whose
# completion the server never got runs again (see db/steps.py, temporal_worker/journal.py)
STEP_JOURNAL = "JOBYARD_STEP_JOURNAL"
DEFAULTS[STEP_JOURNAL] = "true"

# Flow control (jobyard.job_engine.flow, docs/flow-control.md)
FLOW_DURABLE = "JOBYARD_FLOW_DURABLE"  # "false": permits commit without waiting for the disk
FLOW_PARK_SECONDS = "JOBYARD_FLOW_PARK_SECONDS"  # unwoken sleep of a slot's waiter, per turn back
FLOW_ADMISSION_SECONDS = "JOBYARD_FLOW_ADMISSION_SECONDS"  # a slot taken at dispatch lasts this
DEFAULTS[FLOW_DURABLE] = "true"
DEFAULTS[FLOW_PARK_SECONDS] = "60"
DEFAULTS[FLOW_ADMISSION_SECONDS] = "60"

# Jobs that wait for jobs (ctx.child, ctx.children; jobyard.job_engine.waits)
MAX_CHILDREN = "JOBYARD_MAX_CHILDREN"  # most children one ctx.children call may start
# Longest a waiting job goes between two looks at the job log for its children's endings; the
# looks start at a fraction of a second and grow with the wait (waits.next_look)
WAIT_POLL_MAX = "JOBYARD_WAIT_POLL_MAX"
# An event sent up to this many seconds before a ctx.wait_for_event began still resumes it
EVENT_LOOKBACK = "JOBYARD_EVENT_LOOKBACK"
DEFAULTS[MAX_CHILDREN] = "10000"
DEFAULTS[WAIT_POLL_MAX] = "10"
DEFAULTS[EVENT_LOOKBACK] = "300"

# Moving jobs of worker-less queues to Temporal (jobyard temporal-worker)
RESCUE_INTERVAL = "JOBYARD_RESCUE_INTERVAL"  # seconds between passes
DEFAULTS[RESCUE_INTERVAL] = "5"

RECORD_RETENTION = "JOBYARD_RECORD_RETENTION"  # seconds a finished job's Redis records are kept
DEFAULTS[RECORD_RETENTION] = str(7 * 24 * 3600)
JOB_LOG_RETENTION_DAYS = "JOBYARD_JOB_LOG_RETENTION_DAYS"  # `jobyard db prune` default age
DEFAULTS[JOB_LOG_RETENTION_DAYS] = "30"

# Schedules (jobyard.job_engine.schedules, jobyard.dispatcher.scheduler)
# Per schedule: JOBYARD_SCHEDULE_<NAME> = off | a 5-field cron | an interval in whole seconds
SCHEDULER = "JOBYARD_SCHEDULER"  # "false": this worker / temporal-worker process does not schedule
SCHEDULER_POLL = "JOBYARD_SCHEDULER_POLL"  # seconds; longest sleep between passes
SCHEDULER_LEASE = "JOBYARD_SCHEDULER_LEASE"  # seconds before another scheduler takes over a tick
SCHEDULER_GRACE = "JOBYARD_SCHEDULER_GRACE"  # seconds late a tick may be and still be on time
SCHEDULER_RETENTION = "JOBYARD_SCHEDULER_RETENTION"  # days a fired tick's row is kept
DEFAULTS.update(
    {
        SCHEDULER: "true",
        SCHEDULER_POLL: "1",
        SCHEDULER_LEASE: "30",
        SCHEDULER_GRACE: "5",
        SCHEDULER_RETENTION: "30",
    }
)

# OpenTelemetry (jobyard.job_engine.tracing): OpenTelemetry's own variables. With an endpoint set
# (and the `jobyard[otel]` extra installed), every jobyard process exports its spans over OTLP/HTTP.
OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"  # e.g. http://collector:4318
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"  # the full traces URL
OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"  # "true": no tracing even with an endpoint set
OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"  # the spans' service.name
DEFAULTS[OTEL_SDK_DISABLED] = "false"
DEFAULTS[OTEL_SERVICE_NAME] = "jobyard"

# Encryption at rest (jobyard.job_engine.crypto): "k2:<base64 32 bytes>,k1:<...>", the first key
# encrypts, every key decrypts. Unset: payloads, results, errors and progress are kept as they are.
ENCRYPTION_KEYS = "JOBYARD_ENCRYPTION_KEYS"
# `jobyard keys rotate`: job log rows re-encrypted per transaction
ROTATE_BATCH = "JOBYARD_ROTATE_BATCH"
DEFAULTS[ROTATE_BATCH] = "500"

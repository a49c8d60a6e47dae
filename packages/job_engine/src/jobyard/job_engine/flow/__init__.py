"""Flow control shared by both engines: declarations (`Concurrency`, `Debounce`, a keyed
`RateLimit`, priorities), the limiter rules as pure functions (`limiter`), the permit store in
the job log's database (`store`), what the engines call (`gate`), why a held job waits
(`waiting`) and its Prometheus counts (`metrics`). See docs/flow-control.md.

This package imports no database driver: `store`, `gate` and `metrics` are imported by the
code that uses them, only for jobs that declare a limit."""

from jobyard.job_engine.flow.declarations import (
    DEFAULT_PRIORITY,
    PRIORITY_MAX,
    PRIORITY_MIN,
    Concurrency,
    Debounce,
    FlowDeclarationError,
    InvalidPriorityError,
    KeyedRateLimit,
    MissingKeyError,
    check_key_path,
    payload_key,
    rate_limit_key,
    validate_priority,
)

__all__ = [
    "DEFAULT_PRIORITY",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "Concurrency",
    "Debounce",
    "FlowDeclarationError",
    "InvalidPriorityError",
    "KeyedRateLimit",
    "MissingKeyError",
    "check_key_path",
    "payload_key",
    "rate_limit_key",
    "validate_priority",
]

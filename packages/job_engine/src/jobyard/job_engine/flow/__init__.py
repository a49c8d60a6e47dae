"""Flow control shared by both engines: declarations (`Concurrency`, `Debounce`, a keyed
`RateLimit`, priorities), the limiter rules as pure functions (`limiter`), the permit store in
the job log's database (`store`) and why a held job waits (`waiting`).
See docs/flow-control.md."""

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

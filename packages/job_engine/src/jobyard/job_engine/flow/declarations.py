"""What a job or a queue declares about its flow: `Concurrency`, `Debounce`, a keyed
`RateLimit`, and a dispatch's priority, each checked where it is written.

A key names a payload field (`"tenant_id"`, or dotted for nested: `"account.tenant_id"`); its
value in each payload picks the bucket the limit counts in. The path is checked against the
job's payload model at declaration (`check_key_path`) and read from each payload at dispatch
(`payload_key`): a payload without it is refused there, never run unlimited.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from jobyard.job_engine.errors import FlowDeclarationError as FlowDeclarationError
from jobyard.job_engine.errors import InvalidPayloadError, JobyardError
from jobyard.job_engine.policy import RateLimit
from jobyard.job_engine.policy import check_key_syntax as check_key_syntax

PRIORITY_MIN = -100
PRIORITY_MAX = 100
DEFAULT_PRIORITY = 0
#: A key value longer than this is refused at dispatch (it is a column of the permit store).
MAX_KEY_LENGTH = 200


class InvalidPriorityError(JobyardError, ValueError):
    """A priority that is not an int from PRIORITY_MIN to PRIORITY_MAX (HTTP 422)."""

    def __init__(self, value: object) -> None:
        super().__init__(
            f"priority must be an int from {PRIORITY_MIN} to {PRIORITY_MAX} (higher runs first),"
            f" got {value!r}"
        )
        self.value = value


class MissingKeyError(InvalidPayloadError):
    """The payload lacks the field a limit is keyed on (HTTP 422, like any invalid payload)."""

    def __init__(self, job_name: str, path: str, reason: str) -> None:
        super().__init__(job_name, f"flow-control key {path!r}: {reason}")
        self.path = path


def _positive_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FlowDeclarationError(f"{what} must be a number of seconds, got {value!r}")
    if value <= 0:
        raise FlowDeclarationError(f"{what} must be more than 0 seconds, got {value!r}")
    return float(value)


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FlowDeclarationError(f"{what} must be an int of at least 1, got {value!r}")
    return value


#: The keyed rate limit is `RateLimit` itself (its `key` field); the name stays for callers.
KeyedRateLimit = RateLimit


@dataclass(frozen=True)
class Concurrency:
    """At most `limit` runs of the job at once for each value of `key` (one bucket when None),
    across every worker process, host and engine. Keys are served fairly."""

    limit: int
    key: str | None = None

    def __post_init__(self) -> None:
        _count(self.limit, "Concurrency.limit")
        check_key_syntax(self.key, "Concurrency")


@dataclass(frozen=True)
class Debounce:
    """Dispatches with the same key value within `period` seconds of each other collapse into
    one run, with the last dispatch's payload, started `period` after the last dispatch and at
    most `max_wait` after the first (no cap when None)."""

    period: float
    key: str | None = None
    max_wait: float | None = None

    def __post_init__(self) -> None:
        _positive_number(self.period, "Debounce.period")
        check_key_syntax(self.key, "Debounce")
        if self.max_wait is not None:
            _positive_number(self.max_wait, "Debounce.max_wait")
            if self.max_wait < self.period:
                raise FlowDeclarationError(
                    f"Debounce.max_wait ({self.max_wait}) must be at least its period"
                    f" ({self.period})"
                )


def rate_limit_key(rate: RateLimit | None) -> str | None:
    """The key of a rate limit (None for an unkeyed one or none)."""
    return rate.key if rate is not None else None


def validate_priority(value: object) -> int:
    """A dispatch's or a job's priority: an int from -100 to 100; None means the default, 0."""
    if value is None:
        return DEFAULT_PRIORITY
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPriorityError(value)
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise InvalidPriorityError(value)
    return value


def _model_in(annotation: Any) -> type[BaseModel] | bool | None:
    """The pydantic model a field's annotation holds (`Model`, `Model | None`); False when the
    annotation is a model-free scalar; None when it cannot be told (a dict, Any)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if a is not type(None)]
        found = [_model_in(a) for a in models]
        if len(found) == 1:
            return found[0]
        return None
    if origin is typing.Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if annotation in (str, int, float, bool, bytes):
        return False
    return None


def check_key_path(model: type[BaseModel], path: str | None, where: str) -> None:
    """At declaration: every part of `path` is a field of the payload model (as far as the
    model's fields are models themselves). `where` names the declaration in the error."""
    if path is None:
        return
    check_key_syntax(path, where)
    current: type[BaseModel] | bool | None = model
    walked: list[str] = []
    for part in path.split("."):
        if current is None:
            return  # a dict or Any: only the payload can tell
        if current is False:
            raise FlowDeclarationError(
                f"{where}: key {path!r}: {'.'.join(walked)!r} is not an object"
            )
        assert not isinstance(current, bool)
        fields = current.model_fields
        if part not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise FlowDeclarationError(
                f"{where}: key {path!r}: {current.__name__} has no field {part!r} (fields: {known})"
            )
        walked.append(part)
        current = _model_in(fields[part].annotation)


def payload_key(job_name: str, data: Any, path: str | None) -> str:
    """The bucket a payload (its JSON form, a dict) counts in for a limit keyed on `path`:
    "" for an unkeyed limit. A string value is itself; an int or a bool its JSON text. A missing
    field, null, an object, a list or a float is refused (MissingKeyError), never unlimited."""
    if path is None:
        return ""
    value: Any = data
    walked: list[str] = []
    for part in path.split("."):
        if not isinstance(value, dict):
            where = ".".join(walked) or "the payload"
            raise MissingKeyError(job_name, path, f"{where} is not an object")
        if part not in value:
            missing = ".".join([*walked, part])
            raise MissingKeyError(job_name, path, f"the payload has no {missing!r}")
        value = value[part]
        walked.append(part)
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int):
        text = json.dumps(value)
    elif value is None:
        raise MissingKeyError(job_name, path, "the value is null")
    else:
        kind = type(value).__name__
        raise MissingKeyError(
            job_name, path, f"the value must be a string, an int or a bool, not {kind}"
        )
    if len(text) > MAX_KEY_LENGTH:
        raise MissingKeyError(
            job_name, path, f"the value is {len(text)} characters; the limit is {MAX_KEY_LENGTH}"
        )
    return text

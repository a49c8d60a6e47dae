"""Declaring a job once: name, queue, payload schema, retry policy, timeout, rate limit.

Engines derive their registrations (a Dramatiq actor, the Temporal workflow's dispatch table) from
this registry; nothing else is written per job.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NamedTuple

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from jobyard.job_engine import env, queues, strictjson
from jobyard.job_engine.context import JobContext
from jobyard.job_engine.env import JOB_MODULES as JOB_MODULES_ENV
from jobyard.job_engine.errors import (
    InvalidPayloadError,
    JobyardError,
    MissingSettingError,
    PayloadTooLargeError,
    UnknownJobError,
)
from jobyard.job_engine.flow.declarations import (
    DEFAULT_PRIORITY,
    Concurrency,
    Debounce,
    check_key_path,
    validate_priority,
)
from jobyard.job_engine.flow.limits import DeclaredLimit, job_limits
from jobyard.job_engine.policy import RateLimit, RetryPolicy, retry_with_env, timeout_with_env

Handler = Callable[[JobContext, Any], Coroutine[Any, Any, Any]]


class EncodedPayload(NamedTuple):
    """A payload `JobSpec.encode_many` accepted: its JSON data and that data's strict JSON text
    (what a message embeds, so nobody encodes it again)."""

    data: dict[str, Any]
    text: bytes


@cache
def _list_adapter(model: type[BaseModel]) -> TypeAdapter[list[BaseModel]]:
    """Validates and dumps a list of a job's payloads in one call into pydantic-core: a
    fraction of the per-payload cost of `model_validate` and `model_dump` one by one."""
    return TypeAdapter(list[model])  # type: ignore[valid-type]


BUILTIN_JOB_MODULES = ("jobyard.job_engine.jobs",)


@dataclass(frozen=True)
class JobSpec:
    name: str
    queue: str
    payload_model: type[BaseModel]
    handler: Handler
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 60.0
    rate_limit: RateLimit | None = None
    requires_env: tuple[str, ...] = ()
    description: str = ""
    #: May this job be started over HTTP (POST /jobs/{name})? Jobs with side effects an
    #: API client must never choose the arguments of (deleting files, signing bodies) say False;
    #: they are still dispatched from Python code, schedules and other jobs.
    http: bool = True
    #: -100..100, higher first: where the job's runs wait among its queue's (see
    #: docs/flow-control.md "Priorities"); a dispatch may give its own.
    priority: int = DEFAULT_PRIORITY
    #: At most `limit` runs at once per key value, across every process, host and engine.
    concurrency: Concurrency | None = None
    #: Dispatches of a key within `period` collapse into one run with the last payload.
    debounce: Debounce | None = None
    #: Every flow-control limit the job is under (its own, then its queue's), fixed at
    #: declaration; `limited` is False for a job with none, which then never touches the permit
    #: store: the engines check this one attribute.
    limits: tuple[DeclaredLimit, ...] = field(default=(), init=False, compare=False)
    limited: bool = field(default=False, init=False, compare=False)

    def __post_init__(self) -> None:
        declared_queue = queues.declared(self.queue)
        limits = job_limits(
            self.name, self.queue, rate_limit=self.rate_limit, concurrency=self.concurrency,
            debounce=self.debounce,
            queue_rate_limit=declared_queue.rate_limit if declared_queue else None,
            queue_concurrency=declared_queue.concurrency_limit if declared_queue else None,
        )  # fmt: skip
        object.__setattr__(self, "limits", limits)
        object.__setattr__(self, "limited", bool(limits))

    def check_environment(self) -> None:
        """Fail at dispatch, not in a worker, when the job cannot run without a setting."""
        missing = [name for name in self.requires_env if not os.environ.get(name)]
        if missing:
            raise MissingSettingError(self.name, missing)

    def effective_retry(self) -> RetryPolicy:
        return retry_with_env(self.name, self.retry)

    def effective_timeout(self) -> float:
        return timeout_with_env(self.name, self.timeout)

    def validate(self, payload: Any) -> BaseModel:
        """Parse a payload (a dict or strict JSON text) into the job model; raise
        InvalidPayloadError."""
        try:
            if isinstance(payload, str | bytes | bytearray):
                payload = strictjson.loads(payload)
            elif isinstance(payload, BaseModel):
                payload = payload.model_dump(mode="json")
            else:
                strictjson.check(payload, other_types=True)
        except strictjson.StrictJSONError as exc:
            raise InvalidPayloadError(self.name, str(exc)) from None
        try:
            return self.payload_model.model_validate(payload)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False)
            reason = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in errors
            )
            raise InvalidPayloadError(self.name, reason, errors) from None

    def encode(self, payload: Any) -> dict[str, Any]:
        """Validate and return the JSON form that crosses to an engine.

        Strict JSON (no NaN, Infinity, lone surrogates or deep nesting) and at most
        JOBYARD_MAX_PAYLOAD_BYTES of it, checked here so that no engine is touched by a payload
        one of them could not carry or a reader could not read back.
        """
        return self.encode_with_text(payload).data

    def encode_with_text(self, payload: Any) -> EncodedPayload:
        """`encode`, with the JSON text its size was measured on."""
        model = self.validate(payload)
        try:
            data = model.model_dump(mode="json")
            # Checked again: a model may compute values its input did not have.
            text = strictjson.dumps_checked(data)
        except (ValueError, PydanticSerializationError) as exc:  # StrictJSONError included
            raise InvalidPayloadError(self.name, f"not JSON-serialisable: {exc}") from None
        limit = max_payload_bytes()
        if len(text) > limit:
            raise PayloadTooLargeError(self.name, len(text), limit)
        return EncodedPayload(data, text)

    def encode_many(self, payloads: Sequence[Any]) -> list[EncodedPayload | JobyardError]:
        """`encode` of many payloads, with each one's JSON text: one result per payload, in
        order, its error if `encode` would raise one. The same checks, with the schema's work
        done in one call for the batch; a payload it refuses is encoded again on its own, so
        its error is exactly `encode`'s."""
        results: list[EncodedPayload | JobyardError | None] = [None] * len(payloads)
        batched: list[int] = []  # dict payloads whose input is strict JSON
        for index, payload in enumerate(payloads):
            if type(payload) is dict:
                try:
                    strictjson.check(payload, other_types=True)
                except strictjson.StrictJSONError as exc:
                    results[index] = InvalidPayloadError(self.name, str(exc))
                    continue
                batched.append(index)
            else:
                results[index] = self._encode_one(payload)
        adapter = _list_adapter(self.payload_model)
        try:
            models = adapter.validate_python([payloads[i] for i in batched])
            datas = adapter.dump_python(models, mode="json")
        except (ValueError, PydanticSerializationError):  # ValidationError is a ValueError
            for index in batched:
                results[index] = self._encode_one(payloads[index])
            return _all_set(results)
        limit = max_payload_bytes()
        for index, data in zip(batched, datas, strict=True):
            try:
                text = strictjson.dumps_checked(data)
            except ValueError:  # encode names the reason
                results[index] = self._encode_one(payloads[index])
                continue
            if len(text) > limit:
                results[index] = PayloadTooLargeError(self.name, len(text), limit)
            else:
                results[index] = EncodedPayload(data, text)
        return _all_set(results)

    def _encode_one(self, payload: Any) -> EncodedPayload | JobyardError:
        try:
            return self.encode_with_text(payload)
        except JobyardError as exc:
            return exc


def _all_set(
    results: list[EncodedPayload | JobyardError | None],
) -> list[EncodedPayload | JobyardError]:
    missing = [index for index, result in enumerate(results) if result is None]
    if missing:
        raise AssertionError(f"encode_many left payloads {missing[:5]} without a result")
    return results  # type: ignore[return-value]


def max_payload_bytes() -> int:
    """JOBYARD_MAX_PAYLOAD_BYTES (512 KiB by default: well within what a Redis message and a
    Temporal workflow input carry)."""
    return env.get_int(env.MAX_PAYLOAD_BYTES)


class JobRegistry:
    def __init__(self) -> None:
        self._jobs: dict[str, JobSpec] = {}
        self._limited: set[str] = set()  # see limited_names

    def add(self, spec: JobSpec) -> JobSpec:
        existing = self._jobs.get(spec.name)
        if existing is not None and existing.handler is not spec.handler:
            raise ValueError(f"job {spec.name!r} is declared twice")
        self._jobs[spec.name] = spec
        if spec.limited:
            self._limited.add(spec.name)
        return spec

    def limited_names(self) -> set[str]:
        """The names of the jobs under a flow-control limit (`JobSpec.limited`), every job
        module loaded: what a bulk dispatch checks per job, cheaper than each spec's lookup."""
        load_job_modules()
        return self._limited

    def get(self, name: str) -> JobSpec:
        spec = self._jobs.get(name)
        if spec is None:  # not declared yet: maybe in a module not imported yet
            load_job_modules()
            spec = self._jobs.get(name)
            if spec is None:
                raise UnknownJobError(name, list(self._jobs))
        return spec

    def __iter__(self) -> Iterator[JobSpec]:
        load_job_modules()
        return iter(list(self._jobs.values()))

    def names(self) -> list[str]:
        return sorted(spec.name for spec in self)


registry = JobRegistry()


def job(
    name: str,
    *,
    queue: str = "default",
    payload: type[BaseModel],
    retry: RetryPolicy | None = None,
    timeout: float = 60.0,
    rate_limit: RateLimit | None = None,
    requires_env: tuple[str, ...] = (),
    http: bool = True,
    priority: int = DEFAULT_PRIORITY,
    concurrency: Concurrency | None = None,
    debounce: Debounce | None = None,
) -> Callable[[Handler], Handler]:
    """Declare `async def handler(ctx, payload)` as the job `name`.

    `http=False` keeps the job off the HTTP API (403 there, whatever the token).

    `priority`: an int from -100 to 100, higher first, for the job's runs not dispatched with
    one of their own; anything else raises InvalidPriorityError here.

    `queue` names a declared queue (`jobyard.job_engine.queue`): declared above in the same
    module, built in, or by a module of JOBYARD_JOB_MODULES; any other raises
    UnknownQueueError here, at declaration, not at dispatch.

    Flow control (docs/flow-control.md), each optionally keyed on a payload field:
    `rate_limit=RateLimit(calls, period, key=...)`, `concurrency=Concurrency(limit, key=...)`,
    `debounce=Debounce(period, key=..., max_wait=...)`. A key path that is not a field of
    `payload` raises FlowDeclarationError here; so does one of the queue's limits' keys.

    >>> @job("system.echo", payload=EchoPayload, retry=RetryPolicy(attempts=1))
    ... async def echo(ctx, payload): return payload.model_dump()
    """
    if not queues.is_declared(queue):
        raise queues.UnknownQueueError(queue, queues.declared_names())
    priority = validate_priority(priority)
    _check_keys(name, queue, payload, (rate_limit, concurrency, debounce))

    def declare(handler: Handler) -> Handler:
        registry.add(
            JobSpec(
                name=name,
                queue=queue,
                payload_model=payload,
                handler=handler,
                retry=retry or RetryPolicy(),
                timeout=timeout,
                rate_limit=rate_limit,
                requires_env=requires_env,
                http=http,
                priority=priority,
                concurrency=concurrency,
                debounce=debounce,
                description=(handler.__doc__ or "").strip().split("\n")[0],
            )
        )
        return handler

    return declare


def _check_keys(
    name: str,
    queue: str,
    payload: type[BaseModel],
    own: tuple[RateLimit | Concurrency | Debounce | None, ...],
) -> None:
    """Every keyed limit the job is under names a field of its payload model."""
    for limit in own:
        if limit is not None:
            check_key_path(payload, limit.key, f"job {name!r}: {type(limit).__name__}")
    config = queues.declared(queue)
    for shared in (config.rate_limit, config.concurrency_limit) if config else ():
        if shared is not None:
            where = f"job {name!r}: queue {queue!r}'s {type(shared).__name__}"
            check_key_path(payload, shared.key, where)


_loaded: set[str] = set()


def load_job_modules() -> None:
    """Import the built-in jobs and those named in JOBYARD_JOB_MODULES (once per process)."""
    extra = [m.strip() for m in os.environ.get(JOB_MODULES_ENV, "").split(",") if m.strip()]
    for module in (*BUILTIN_JOB_MODULES, *extra):
        if module not in _loaded:
            _loaded.add(module)
            importlib.import_module(module)


def get_spec(name: str) -> JobSpec:
    return registry.get(name)

"""OpenTelemetry tracing: one trace per job, from `dispatch_job` through either engine.

The spans of a job, all in one trace:

- ``jobyard.dispatch`` in the process that called `dispatch_job`: validation, the Redis enqueue
  or the Temporal start. Attributes: the job's id, name and queue, the engine chosen and, if it
  is not Dramatiq, the fallback reason. A `dispatch_many` call is one ``jobyard.dispatch_many``
  span, the spans of its jobs under it.
- ``jobyard.fallback``: the job is started on Temporal instead (at dispatch, or later by the
  rescue in `jobyard temporal-worker` when the queue's Dramatiq workers are gone). Its child,
  ``StartWorkflow:jobyard.job``, is temporalio's TracingInterceptor's, which carries the context
  to the workflow (``RunWorkflow:jobyard.job``) and its activities in Temporal's headers.
- ``jobyard.queue_wait``: from the enqueue (or the workflow's start) to the run's start.
- ``jobyard.run``: one Dramatiq message of the job: its handler, up to a finish, a retry or a
  durable sleep. A retry or a resumed sleep is a new message sent from inside the run, so the
  next run is that run's child: still the one trace.
- ``jobyard.step``: each step that runs (a step recorded by an earlier run returns without one);
  on Temporal inside the step's ``RunActivity:jobyard.step``.

The context crosses Redis in the Dramatiq message's options (W3C ``traceparent``; see
jobyard.queue.messages) and Temporal in its headers.

On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and the
``jobyard[otel]`` extra is installed: spans go over OTLP/HTTP in batches, named by
``OTEL_SERVICE_NAME``. An app that sets OpenTelemetry up itself calls `configure()` instead.
Otherwise off: OpenTelemetry is never imported, and the hot paths (dispatch, message encoding)
read the module's ``ACTIVE`` and do nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from jobyard.job_engine import env

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanKind, Tracer, TracerProvider

log = logging.getLogger("jobyard.tracing")

#: True once this process traces jobs. The hot paths check this and nothing else.
ACTIVE = False
TRACER_NAME = "jobyard"

# Span names
DISPATCH = "jobyard.dispatch"
DISPATCH_MANY = "jobyard.dispatch_many"  # one per dispatch_many call, its jobs under it
FALLBACK = "jobyard.fallback"
QUEUE_WAIT = "jobyard.queue_wait"
RUN = "jobyard.run"
STEP = "jobyard.step"
# Attribute names
JOB_ID = "jobyard.job.id"
JOB_NAME = "jobyard.job.name"
QUEUE = "jobyard.queue"
ENGINE = "jobyard.engine"
STEP_NAME = "jobyard.step"
FALLBACK_REASON = "jobyard.fallback_reason"


_tracer: Tracer | None = None
_provider: Any = None  # the provider in use, flushed by `shutdown`
_lock = threading.Lock()
_warned = False


class _Handle(Protocol):
    @property
    def job_id(self) -> str: ...
    @property
    def engine(self) -> str: ...
    @property
    def fallback_reason(self) -> str | None: ...
    @property
    def duplicate(self) -> bool: ...


H = TypeVar("H", bound=_Handle)


def _wanted() -> bool:
    endpoint = env.get(env.OTEL_EXPORTER_OTLP_ENDPOINT) or env.get(
        env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    )
    return bool(endpoint) and not env.get_bool(env.OTEL_SDK_DISABLED)


def setup_from_env() -> bool:
    """Turn tracing on if the environment names an OTLP endpoint; returns `ACTIVE`. Idempotent:
    each jobyard process calls it as it starts (its dispatcher, its Dramatiq brokers, the
    Temporal worker), before anything that takes the tracer (the Temporal client's interceptor)."""
    global ACTIVE, _tracer, _provider, _warned
    if ACTIVE or not _wanted():
        return ACTIVE
    with _lock:
        if ACTIVE:
            return True
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            if not _warned:
                _warned = True
                log.warning(
                    "%s is set but OpenTelemetry is missing (%s): no traces. "
                    "Install jobyard[otel].",
                    env.OTEL_EXPORTER_OTLP_ENDPOINT,
                    exc,
                )
            return False
        provider = trace.get_tracer_provider()
        if not isinstance(provider, SdkTracerProvider):  # the app has not set one up itself
            resource = Resource.create({"service.name": env.get_str(env.OTEL_SERVICE_NAME)})
            provider = SdkTracerProvider(resource=resource)
            # Batched, in a background thread: a job never waits for the collector.
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            # Global, so that instrumented libraries a step calls (httpx, psycopg...) join in.
            trace.set_tracer_provider(provider)
        _provider = provider
        _tracer = provider.get_tracer(TRACER_NAME)
        ACTIVE = True
    return True


def configure(provider: TracerProvider | None = None) -> None:
    """Trace jobs with `provider` (default: the global tracer provider), in an app that sets
    OpenTelemetry up itself, or a test. Call it before the first dispatch: the Temporal client
    takes its tracing interceptor when it connects."""
    global ACTIVE, _tracer, _provider
    from opentelemetry import trace

    _provider = provider or trace.get_tracer_provider()
    _tracer = _provider.get_tracer(TRACER_NAME)
    ACTIVE = True


def reset() -> None:
    """Stop tracing (tests). A provider set up from the environment stays global."""
    global ACTIVE, _tracer, _provider
    ACTIVE, _tracer, _provider = False, None, None


def shutdown(timeout: float = 5.0) -> None:
    """Export the spans still buffered: for a process about to `os._exit`, which skips the
    exporter's own exit hook."""
    flush = getattr(_provider, "force_flush", None)
    if ACTIVE and flush is not None:
        try:
            flush(int(timeout * 1000))
        except Exception as exc:  # a collector that is down must not stop the process stopping
            log.warning("spans not exported at exit: %s", exc)


def tracer() -> Tracer:
    if _tracer is None:
        raise RuntimeError("jobyard tracing is not configured")
    return _tracer


def _kind(name: str) -> SpanKind:
    from opentelemetry.trace import SpanKind

    return SpanKind[name.upper()]


def inject() -> dict[str, str]:
    """The current context as W3C headers, to send along with a job."""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> Context | None:
    """The context sent with a job (None: use the current one)."""
    if not carrier:
        return None
    from opentelemetry import propagate

    return propagate.extract(dict(carrier))


def job_attributes(job_id: str, name: str, queue: str | None, engine: str) -> dict[str, str]:
    attributes = {JOB_ID: job_id, JOB_NAME: name, ENGINE: engine}
    if queue:
        attributes[QUEUE] = queue
    return attributes


def traced_dispatch(dispatch: Callable[..., H], name: str, *args: Any, **kwargs: Any) -> H:
    """`dispatch(name, ...)` inside a ``jobyard.dispatch`` span; what it enqueues carries it."""
    with tracer().start_as_current_span(
        DISPATCH, kind=_kind("producer"), attributes={JOB_NAME: name}
    ) as span:
        handle = dispatch(name, *args, **kwargs)
        span.set_attributes({JOB_ID: handle.job_id, ENGINE: handle.engine})
        if handle.fallback_reason:
            span.set_attribute(FALLBACK_REASON, handle.fallback_reason)
        if handle.duplicate:
            span.set_attribute("jobyard.duplicate", True)
        return handle


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any],
    *,
    parent: Mapping[str, str] | None = None,
    kind: str = "internal",
) -> Iterator[Span]:
    """A span made current for the block, the child of `parent` (W3C headers) if given, else
    of the current span. An exception out of the block is recorded on it."""
    from opentelemetry import context as otel_context

    context = extract(parent)
    token = otel_context.attach(context) if context is not None else None
    try:
        with tracer().start_as_current_span(name, kind=_kind(kind), attributes=attributes) as s:
            yield s
    finally:
        if token is not None:
            otel_context.detach(token)


def start_span(
    name: str,
    attributes: Mapping[str, Any],
    *,
    parent: Mapping[str, str] | None = None,
    kind: str = "internal",
    start: float | None = None,
) -> Span:
    """A span begun (at `start`, unix seconds) and not made current: the caller ends it."""
    return tracer().start_span(
        name,
        context=extract(parent),
        kind=_kind(kind),
        attributes=attributes,
        start_time=_ns(start) if start is not None else None,
    )


def completed_span(
    name: str,
    attributes: Mapping[str, Any],
    *,
    start: float,
    end: float | None = None,
    parent: Mapping[str, str] | None = None,
) -> None:
    """A span of a time already past, e.g. a queue wait measured when the run starts."""
    end_ns = _ns(end) if end is not None else time.time_ns()
    started = tracer().start_span(
        name, context=extract(parent), attributes=attributes, start_time=min(_ns(start), end_ns)
    )
    started.end(end_time=end_ns)


@contextlib.contextmanager
def current(span: Span) -> Iterator[None]:
    """Make `span` the current span for the block (its children and what is enqueued in it)."""
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False):
        yield


def step(
    job_id: str, step: str, engine: str, **attributes: Any
) -> contextlib.AbstractContextManager[Span]:
    """The ``jobyard.step`` span of a step that runs now."""
    return span(STEP, {JOB_ID: job_id, STEP_NAME: step, ENGINE: engine, **attributes})


def event(name: str, **attributes: Any) -> None:
    """An event on the current span (a job's state change)."""
    from opentelemetry import trace

    trace.get_current_span().add_event(name, {k: v for k, v in attributes.items() if v is not None})


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)

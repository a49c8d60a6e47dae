"""OpenTelemetry: one connected trace per job, from dispatch_job through either engine to each
step, the fallback included (issue 14, item 5).

The test process traces into opentelemetry-sdk's in-memory exporter (`tracing.configure`); the
worker processes are configured as in production, by OTEL_EXPORTER_OTLP_ENDPOINT, and export
over OTLP/HTTP to a receiver this test runs. A job's trace is put together from both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jobyard.dispatcher import JobHandle, dispatch_job, dispatch_many, reset_dispatcher
from jobyard.dispatcher.models import FALLBACK_FLAG_OFF, FALLBACK_RESCUED
from jobyard.job_engine import tracing
from tests.engines import Engines
from tests.otlp import OtlpReceiver, Span, from_sdk
from tests.support import ROOT, start_engines_patiently, wait_for

pytestmark = pytest.mark.timeout(240)


class Spans:
    def __init__(self, memory: InMemorySpanExporter, receiver: OtlpReceiver) -> None:
        self.memory, self.receiver = memory, receiver

    def all(self) -> list[Span]:
        with self.receiver.lock:
            exported = list(self.receiver.spans)
        return [from_sdk(s) for s in self.memory.get_finished_spans()] + exported

    def of(self, job_id: str) -> list[Span]:
        return [s for s in self.all() if s.job_id == job_id]

    def steps(self, job_id: str) -> dict[str, str]:
        """step name -> the engine it ran on, from the job's `jobyard.step` spans."""
        return {
            s.attributes["jobyard.step"]: s.attributes["jobyard.engine"]
            for s in self.of(job_id)
            if s.name == tracing.STEP
        }

    def wait_for_steps(self, job_id: str, expected: dict[str, str]) -> None:
        try:
            wait_for(lambda: self.steps(job_id) == expected, timeout=60, interval=0.1)
        except AssertionError:
            raise AssertionError(f"steps {self.steps(job_id)} != {expected}") from None

    def trace(self, job_id: str) -> list[Span]:
        """The job's trace, checked to be one connected tree rooted at its dispatch span, and
        to hold every span that names the job (Temporal's name it by workflow id). A parent
        ends, so is exported, after its children: its batch may still be on the way."""
        (dispatch,) = [s for s in self.of(job_id) if s.name == tracing.DISPATCH]
        assert dispatch.parent_id is None and dispatch.source == "test", dispatch

        def problems() -> tuple[list[Span], list[Span], list[Span]]:
            trace = [s for s in self.all() if s.trace_id == dispatch.trace_id]
            elsewhere = [s for s in self.of(job_id) if s.trace_id != dispatch.trace_id]
            ids = {s.span_id for s in trace}
            orphans = [s for s in trace if s != dispatch and s.parent_id not in ids]
            return trace, elsewhere, orphans

        with contextlib.suppress(AssertionError):
            wait_for(lambda: not any(problems()[1:]), timeout=20, interval=0.1)
        trace, elsewhere, orphans = problems()
        assert not elsewhere, f"spans of job {job_id} outside its trace: {elsewhere}"
        assert not orphans, f"spans whose parent is not in the trace: {orphans}"
        return trace


def batch_is_one_trace(spans: Spans, batch: list[JobHandle | Exception]) -> None:
    """Each of the batch's jobs' runs is a child of the (one) dispatch_many span."""
    ids = {h.job_id for h in batch if isinstance(h, JobHandle)}
    assert len(ids) == len(batch), batch

    def runs() -> list[Span]:
        return [s for s in spans.all() if s.name == tracing.RUN and s.job_id in ids]

    wait_for(lambda: len(runs()) == len(ids), timeout=60)
    (many,) = [s for s in spans.all() if s.name == tracing.DISPATCH_MANY]
    assert {(r.trace_id, r.parent_id) for r in runs()} == {(many.trace_id, many.span_id)}


def ancestry(trace: list[Span], span: Span) -> list[str]:
    """The names from `span` up to the root."""
    by_id = {s.span_id: s for s in trace}
    names = []
    current: Span | None = span
    while current is not None:
        names.append(current.name)
        current = by_id.get(current.parent_id) if current.parent_id else None
    return names


def step_span(trace: list[Span], step: str) -> Span:
    (found,) = [s for s in trace if s.name == tracing.STEP and s.attributes["jobyard.step"] == step]
    return found


@pytest.fixture
def spans(jobyard_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    receiver = OtlpReceiver().start()
    # For the worker processes (they inherit the environment): export in batches every 100 ms.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.configure(provider)
    reset_dispatcher()  # its Temporal client connects with the tracing interceptor
    try:
        yield Spans(memory, receiver)
    finally:
        reset_dispatcher()
        tracing.reset()
        receiver.stop()


def test_a_dramatiq_job_is_one_trace(spans: Spans, engines: Engines, tmp_path: Path) -> None:
    engines.start_worker(queues="default")
    handle = dispatch_job("test.two_steps", {"marker_dir": str(tmp_path), "sleep": 0})
    assert handle.engine == "dramatiq"
    assert engines.wait(handle.job_id).state == "succeeded"
    spans.wait_for_steps(handle.job_id, {"first": "dramatiq", "second": "dramatiq"})

    trace = spans.trace(handle.job_id)
    names = sorted(s.name for s in trace)
    assert names == sorted(
        [tracing.DISPATCH, tracing.QUEUE_WAIT, tracing.RUN, tracing.STEP, tracing.STEP]
    ), names
    (run,) = [s for s in trace if s.name == tracing.RUN]
    assert run.source == "otlp" and "jobyard.succeeded" in run.events
    for step in ("first", "second"):
        assert ancestry(trace, step_span(trace, step)) == [
            tracing.STEP, tracing.RUN, tracing.DISPATCH,
        ]  # fmt: skip
    (wait,) = [s for s in trace if s.name == tracing.QUEUE_WAIT]
    assert wait.end_ns <= run.start_ns + 1000 and wait.start_ns <= wait.end_ns

    # A batch is one trace: each of its jobs' runs is a child of the dispatch_many span.
    batch = dispatch_many([("system.echo", {"i": 1}), ("system.echo", {"i": 2})])
    batch_is_one_trace(spans, batch)


def test_a_temporal_job_is_one_trace(spans: Spans, engines: Engines, tmp_path: Path) -> None:
    start_engines_patiently(engines, temporal=True)
    handle = engines.dispatch(
        "temporal", "test.two_steps", {"marker_dir": str(tmp_path), "sleep": 0}
    )
    assert handle.fallback_reason == FALLBACK_FLAG_OFF
    assert engines.wait(handle.job_id).state == "succeeded"
    spans.wait_for_steps(handle.job_id, {"first": "temporal", "second": "temporal"})

    trace = spans.trace(handle.job_id)
    (fallback,) = [s for s in trace if s.name == tracing.FALLBACK]
    assert fallback.attributes["jobyard.fallback_reason"] == FALLBACK_FLAG_OFF
    for step in ("first", "second"):
        path = ancestry(trace, step_span(trace, step))
        assert path[:2] == [tracing.STEP, "RunActivity:jobyard.step"], path
        # TracingInterceptor's workflow spans are children of the start, as its activities.
        assert path[-3:] == ["StartWorkflow:jobyard.job", tracing.FALLBACK, tracing.DISPATCH]
    names = {s.name for s in trace}
    assert {"RunWorkflow:jobyard.job", tracing.QUEUE_WAIT} <= names, names


def test_a_job_moved_from_dramatiq_to_temporal_is_one_trace(
    spans: Spans, engines: Engines, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Its first step runs on Dramatiq, then it parks in ctx.sleep; its worker dies and the
    rescue moves it to Temporal, where its second step runs: all under the one dispatch."""
    monkeypatch.setenv("JOBYARD_RESCUE_INTERVAL", "0.5")
    start_engines_patiently(engines, queues="default", temporal=True)
    handle = dispatch_job("test.two_steps", {"marker_dir": str(tmp_path), "sleep": 4})
    assert handle.engine == "dramatiq"
    # The worker has exported its run (ended by the park) before it is killed.
    wait_for(lambda: any(s.name == tracing.RUN for s in spans.of(handle.job_id)), timeout=30)
    assert engines.worker is not None
    engines.worker.signal_group(signal.SIGKILL)
    engines.worker.proc.wait()

    status = engines.wait(handle.job_id, timeout=90)
    assert (status.state, status.engine) == ("succeeded", "temporal"), status
    spans.wait_for_steps(handle.job_id, {"first": "dramatiq", "second": "temporal"})

    trace = spans.trace(handle.job_id)
    assert ancestry(trace, step_span(trace, "first")) == [
        tracing.STEP, tracing.RUN, tracing.DISPATCH,
    ]  # fmt: skip
    (fallback,) = [s for s in trace if s.name == tracing.FALLBACK]
    assert fallback.attributes["jobyard.fallback_reason"] == FALLBACK_RESCUED
    second = ancestry(trace, step_span(trace, "second"))
    # The parked run sent the message the rescue moved: the fallback continues from the run.
    assert second[-4:] == [
        "StartWorkflow:jobyard.job", tracing.FALLBACK, tracing.RUN, tracing.DISPATCH,
    ], second  # fmt: skip
    assert "RunWorkflow:jobyard.job" in {s.name for s in trace}


def test_a_job_dispatched_in_a_transaction_is_one_trace(
    spans: Spans, engines: Engines, tmp_path: Path
) -> None:
    """The outbox row carries its dispatch's context: the relay (in the worker's supervisor, a
    process of its own) sends the job under it, so its run and steps join the caller's trace."""
    from jobyard.job_engine.db import get_engine

    engines.start_worker(queues="default")
    with get_engine().begin() as connection:
        handle = dispatch_job(
            "test.two_steps", {"marker_dir": str(tmp_path), "sleep": 0}, connection=connection
        )
    assert handle.engine == "outbox"
    assert engines.wait(handle.job_id).state == "succeeded"
    spans.wait_for_steps(handle.job_id, {"first": "dramatiq", "second": "dramatiq"})

    trace = spans.trace(handle.job_id)
    (dispatch,) = [s for s in trace if s.name == tracing.DISPATCH]
    assert dispatch.attributes["jobyard.engine"] == "outbox"
    for step in ("first", "second"):
        assert ancestry(trace, step_span(trace, step)) == [
            tracing.STEP, tracing.RUN, tracing.DISPATCH,
        ]  # fmt: skip

    with get_engine().begin() as connection:
        batch = dispatch_many(
            [("system.echo", {"i": 1}), ("system.echo", {"i": 2})], connection=connection
        )
    batch_is_one_trace(spans, batch)


OFF_PROBE = """
import sys
from jobyard.dispatcher import dispatch_job, get_dispatcher
from jobyard.dispatcher.models import FALLBACK_FLAG_OFF, FALLBACK_RESCUED
from jobyard.job_engine import tracing
from jobyard.queue.messages import encode_job_message
import jobyard.queue.broker, jobyard.temporal_worker.worker, jobyard.worker.process

encode_job_message("system.echo", "default", "job-1", {})
get_dispatcher()
# redis-py imports OpenTelemetry's metrics when it is installed; jobyard's tracing imports none
# of what it would trace with.
TRACING = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.propagate",
           "temporalio.contrib.opentelemetry")
print(tracing.ACTIVE, sorted(m for m in sys.modules if m.startswith(TRACING)))
"""


def test_without_an_endpoint_nothing_is_traced_or_imported(jobyard_env: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", OFF_PROBE], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False []", out.stdout

"""Spans in a test: an OTLP/HTTP receiver that jobyard's worker processes export to (set up by
OTEL_EXPORTER_OTLP_ENDPOINT, as in production), and the test process's own in-memory exporter.
Both give `Span`s, so one job's trace can be put together from every process it crossed."""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(hash=False)
    events: tuple[str, ...] = ()
    source: str = ""  # "test" (in memory) or "otlp" (another process)

    @property
    def job_id(self) -> str | None:
        return self.attributes.get("jobyard.job.id") or self.attributes.get("temporalWorkflowID")


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class OtlpReceiver:
    """Accepts POST /v1/traces (protobuf, as opentelemetry-exporter-otlp-proto-http sends)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, request: ExportTraceServiceRequest) -> None:
        spans = [
            Span(
                trace_id=s.trace_id.hex(),
                span_id=s.span_id.hex(),
                parent_id=s.parent_span_id.hex() or None,
                name=s.name,
                start_ns=s.start_time_unix_nano,
                end_ns=s.end_time_unix_nano,
                attributes={a.key: _value(a.value) for a in s.attributes},
                events=tuple(e.name for e in s.events),
                source="otlp",
            )
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for s in scope_spans.spans
        ]
        with self.lock:
            self.spans.extend(spans)


def from_sdk(span: Any) -> Span:
    """An opentelemetry-sdk ReadableSpan (InMemorySpanExporter's) as a `Span`."""
    return Span(
        trace_id=f"{span.context.trace_id:032x}",
        span_id=f"{span.context.span_id:016x}",
        parent_id=f"{span.parent.span_id:016x}" if span.parent else None,
        name=span.name,
        start_ns=span.start_time,
        end_ns=span.end_time,
        attributes=dict(span.attributes or {}),
        events=tuple(e.name for e in span.events),
        source="test",
    )

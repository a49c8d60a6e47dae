"""Local stand-ins for the outside world, speaking the real protocols on free local ports.

* `GeminiServer` - HTTP server speaking Gemini's REST `generateContent` shape; records every
  request it receives and can be scripted to answer errors.
* `WebhookReceiver` - HTTP server that verifies jobyard's webhook signature on every POST.
* `SmtpSink` - a real SMTP server (aiosmtpd) that keeps every message it accepts.
* `InlineChildRunner` - a `children.install_dispatcher` hook that really runs each child job
  with the in-process engine and records it.
"""

from __future__ import annotations

import concurrent.futures
import email
import email.policy
import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from jobyard.job_engine import signing
from jobyard.job_engine.inline import run_inline


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _HttpPeer:
    """A ThreadingHTTPServer on 127.0.0.1:<free port>, run in a daemon thread."""

    handler_class: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        self.lock = threading.Lock()
        handler = type("Handler", (self.handler_class,), {"peer": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> _HttpPeer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    peer: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


# --- Gemini ------------------------------------------------------------------------------------

_GENERATE = re.compile(r"^/(?P<version>v1beta|v1)/models/(?P<model>[^/:]+):generateContent$")
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


@dataclass
class GeminiRequest:
    path: str
    version: str
    model: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float


def gemini_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """An error answer in Google's shape."""
    return status, {
        "error": {
            "code": status,
            "message": message,
            "status": _STATUS_NAMES.get(status, "UNKNOWN"),
        }
    }


class _GeminiHandler(_QuietHandler):
    peer: GeminiServer

    def do_POST(self) -> None:
        raw = self._read_body()
        match = _GENERATE.match(self.path.split("?", 1)[0])
        if match is None:
            self._send_json(*gemini_error(404, f"unknown method {self.path}"))
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send_json(*gemini_error(400, "Invalid JSON payload received."))
            return
        status, answer = self.peer.record_and_answer(
            GeminiRequest(
                path=self.path,
                version=match["version"],
                model=match["model"],
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                received_at=time.time(),
            )
        )
        self._send_json(status, answer)


class GeminiServer(_HttpPeer):
    """`POST /v1beta/models/{model}:generateContent`. Answers `Reply #n: <last user text>`.

    `script(status, body)` queues answers given before the default ones; `api_key` (when set) is
    checked like Gemini does (400 INVALID_ARGUMENT "API key not valid").
    """

    handler_class = _GeminiHandler

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self.requests: list[GeminiRequest] = []
        self._script: deque[tuple[int, dict[str, Any]]] = deque()
        self.delay = 0.0  # seconds to wait before answering (a slow or hung Gemini)

    def script(self, status: int, body: dict[str, Any] | None = None, *, message: str = "") -> None:
        self._script.append((status, body) if body is not None else gemini_error(status, message))

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def record_and_answer(self, request: GeminiRequest) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append(request)
            number = len(self.requests)
            scripted = self._script.popleft() if self._script else None
        if self.delay:
            time.sleep(self.delay)
        if scripted is not None:
            return scripted
        if self.api_key is not None and request.headers.get("x-goog-api-key") != self.api_key:
            return gemini_error(400, "API key not valid. Please pass a valid API key.")
        contents = request.body.get("contents") or []
        last = contents[-1]["parts"][0]["text"] if contents else ""
        text = f"Reply #{number}: {last}"
        prompt_tokens = sum(len(c["parts"][0].get("text", "").split()) for c in contents)
        output_tokens = len(text.split())
        return 200, {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": text}]},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": prompt_tokens + output_tokens,
            },
            "modelVersion": request.model,
        }


# --- webhooks ----------------------------------------------------------------------------------


@dataclass
class WebhookDelivery:
    path: str
    headers: dict[str, str]
    raw: bytes
    verified: bool

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class _WebhookHandler(_QuietHandler):
    peer: WebhookReceiver

    def do_POST(self) -> None:
        raw = self._read_body()
        verified = signing.verify(self.peer.secret, raw, dict(self.headers.items()))
        with self.peer.lock:
            self.peer.deliveries.append(
                WebhookDelivery(self.path, dict(self.headers.items()), raw, verified)
            )
        self._send_json(200 if verified else 401, {"ok": verified})


class WebhookReceiver(_HttpPeer):
    """Accepts POSTs signed with `secret` (200) and refuses the others (401); keeps them all."""

    handler_class = _WebhookHandler

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret
        self.deliveries: list[WebhookDelivery] = []


# --- SMTP --------------------------------------------------------------------------------------


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    login: str | None

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.default)  # type: ignore[return-value]


@dataclass
class _SinkHandler:
    sink: SmtpSink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = session.auth_data.login.decode() if session.auth_data else None
        with self.sink.lock:
            self.sink.messages.append(
                ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), envelope.content, login)
            )
            if self.sink.fail_next_data > 0:
                # The message reached us, but the client is told to try again: exactly the
                # situation in which a receiver sees one email twice.
                self.sink.fail_next_data -= 1
                return "451 4.3.0 Temporary local problem, try again"
        return "250 2.0.0 Message accepted for delivery"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        with self.sink.lock:
            self.sink.rcpt_attempts.append(address)
        if address.split("@")[-1] in self.sink.rejected_domains:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"


class SmtpSink:
    """aiosmtpd on 127.0.0.1:<free port>. `fail_next_data` answers 451 after keeping a message;
    `credentials` (user, password) requires AUTH LOGIN/PLAIN (allowed without TLS, locally)."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.lock = threading.Lock()
        self.messages: list[ReceivedMail] = []
        self.fail_next_data = 0
        self.rejected_domains: set[str] = set()  # RCPT to these domains: 550
        self.rcpt_attempts: list[str] = []
        self.port = free_port()
        kwargs: dict[str, Any] = {}
        if credentials is not None:

            def authenticate(
                server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
            ) -> AuthResult:
                ok = (
                    isinstance(auth_data, LoginPassword)
                    and (
                        auth_data.login.decode(),
                        auth_data.password.decode(),
                    )
                    == credentials
                )
                return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

            kwargs = {
                "authenticator": authenticate,
                "auth_required": True,
                "auth_require_tls": False,
            }
        self.controller = Controller(
            _SinkHandler(self), hostname="127.0.0.1", port=self.port, **kwargs
        )

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


# --- child jobs --------------------------------------------------------------------------------


@dataclass
class InlineChildRunner:
    """A dispatcher hook that runs each child for real with `run_inline` (in a thread of its own:
    the parent's event loop is running) and records what it ran. A known job id is not run twice,
    like the real dispatcher."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def __call__(self, name: str, payload: Any, job_id: str) -> dict[str, Any]:
        self.calls.append({"name": name, "payload": payload, "job_id": job_id})
        if job_id not in self.results and job_id not in self.errors:
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                future = pool.submit(run_inline, name, payload, job_id=job_id)
                try:
                    self.results[job_id] = future.result(timeout=120)
                except Exception as exc:
                    self.errors[job_id] = exc
        return {"job_id": job_id, "engine": "inline"}

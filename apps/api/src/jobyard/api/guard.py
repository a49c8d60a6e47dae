"""The HTTP boundary's guard, one ASGI middleware in front of every route:

* Host allow-list (`JOBYARD_ALLOWED_HOSTS`, optional): other Host headers get 400, which stops
  DNS-rebinding pages from talking to an API on a developer's machine.
* CSRF: a state-changing request (POST, PUT, PATCH, DELETE) with an `Origin` that is neither
  the API's own nor in `JOBYARD_ALLOWED_ORIGINS` gets 403, and one carrying a body that is not
  `application/json` gets 415. Browsers send cross-site "simple" requests (a form, a no-cors
  fetch) only with form or text content types, so these never reach a route.
* Request body cap (`JOBYARD_MAX_REQUEST_BYTES`): 413 on a larger Content-Length at once, and
  while reading a chunked body, before the whole of it is in memory.
* Security headers on every answer: CSP with `frame-ancestors 'none'` (the dashboard sets its
  own, stricter-than-default one), `nosniff`, `Referrer-Policy: no-referrer`, `no-store`.

Settings are read per request, like the tokens: they open things, and can be changed live.
"""

from __future__ import annotations

import json
import os
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobyard.job_engine import env

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _csv(name: str) -> list[str]:
    return [v.strip() for v in (os.environ.get(name) or "").split(",") if v.strip()]


def _strip_default_port(netloc: str, scheme: str) -> str:
    host, sep, port = netloc.rpartition(":")
    if sep and "]" not in port and port == _DEFAULT_PORTS.get(scheme):
        return host
    return netloc


def is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def origin_allowed(origin: str, host: str, scheme: str) -> bool:
    """Same origin as the request's Host (the dashboard), or listed in JOBYARD_ALLOWED_ORIGINS."""
    origin = origin.strip().lower().rstrip("/")
    if origin in {o.lower().rstrip("/") for o in _csv(env.ALLOWED_ORIGINS)}:
        return True
    origin_scheme, sep, origin_netloc = origin.partition("://")
    if not sep or not host:
        return False  # "null" (sandboxed frames, file: pages) and garbage
    # Scheme is not compared: behind a TLS-terminating proxy the server sees http while the
    # page is https; a page served from our own host name is ours either way.
    return _strip_default_port(origin_netloc, origin_scheme) == _strip_default_port(
        host.lower(), scheme
    )


def host_allowed(host: str) -> bool:
    allowed = [h.lower() for h in _csv(env.ALLOWED_HOSTS)]
    if not allowed:
        return True
    name = host.lower()
    # [::1]:8000 keeps its brackets; example.com:8000 loses its port
    name = name[: name.find("]") + 1] if name.startswith("[") else name.rsplit(":", 1)[0]
    return any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


def max_request_bytes() -> int:
    return env.get_int(env.MAX_REQUEST_BYTES)


class GuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        send = _with_security_headers(send)
        host = headers.get("host", "")
        if not host_allowed(host):
            await _refuse(send, 400, f"Host {host!r} is not served here ({env.ALLOWED_HOSTS})")
            return
        method = scope["method"]
        if method in STATE_CHANGING:
            origin = headers.get("origin")
            if origin is not None and not origin_allowed(origin, host, scope.get("scheme", "")):
                await _refuse(
                    send,
                    403,
                    f"cross-origin request refused: add the Origin to {env.ALLOWED_ORIGINS}",
                )
                return
            content_type = headers.get("content-type")
            has_body = headers.get("content-length", "0") not in ("", "0") or (
                "transfer-encoding" in headers
            )
            if (content_type is not None or has_body) and not is_json_media_type(
                content_type or ""
            ):
                await _refuse(send, 415, "state-changing requests take application/json only")
                return
        limit = max_request_bytes()
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _refuse(send, 400, "Content-Length is not a number")
                return
            if int(length) > limit:
                await _refuse(send, 413, f"request body over {limit} bytes")
                return
        await self.app(scope, _capped(receive, limit), send)


def _capped(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                # Raised inside the route's body read: the app's exception handling turns it
                # into a 413 before the rest of the body is read.
                raise HTTPException(413, f"request body over {limit} bytes")
        return message

    return capped


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            present = {k.lower() for k, _ in headers}
            for name, value in SECURITY_HEADERS:
                if name not in present:
                    headers.append((name, value))
            if b"content-security-policy" not in present:
                headers.append((b"content-security-policy", API_CSP.encode()))
            if b"cache-control" not in present:
                headers.append((b"cache-control", b"no-store"))
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

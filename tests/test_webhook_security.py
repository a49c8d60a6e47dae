"""Outbound webhooks, closed by default (issue 12): Standard Webhooks signatures any receiver can
verify, signing headers nobody can override, no SSRF in any spelling or after DNS, answers read
up to a cap and kept out of errors, derived ids that always fit.

In-process tests call the delivery step itself (`post_signed`, the function a worker runs)
against a local receiver; the last test runs everything through a real worker.
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks import Webhook

from jobyard.job_engine import PermanentError, UnsafeURLError, env, signing
from jobyard.job_engine.children import fit_job_id
from jobyard.job_engine.jobs import webhook
from tests.conftest import WEBHOOK_SECRET
from tests.engines import Engines

JOB_ID_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}")


@dataclass
class Received:
    headers: list[tuple[str, str]]
    body: bytes

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def one(self, name: str) -> str:
        (value,) = self.all(name)
        return value


@dataclass
class Receiver:
    status: int = 200
    answer: bytes = b""
    endless: bool = False  # stream an answer that never ends
    requests: list[Received] = field(default_factory=list)
    port: int = 0


@contextmanager
def receiver(**options: Any) -> Iterator[Receiver]:
    """An HTTP server on 127.0.0.1 that keeps every request's headers as sent (duplicates too)."""
    state = Receiver(**options)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests.append(Received(list(self.headers.items()), body))
            self.send_response(state.status)
            if state.endless:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"x" * 65536
                try:
                    for _ in range(300 * 16):  # 300 MB if anyone read it all
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except OSError:
                    return  # the client stopped reading: what we want
                return
            self.send_header("Content-Length", str(len(state.answer)))
            self.end_headers()
            self.wfile.write(state.answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def webhook_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.WEBHOOK_SECRET, WEBHOOK_SECRET)
    monkeypatch.setenv(env.WEBHOOK_ALLOW, "127.0.0.1")
    webhook._client = None  # a fresh client per test (the module keeps one per process)


# --- signing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "receiver_key"),
    [
        (WEBHOOK_SECRET, WEBHOOK_SECRET.encode()),  # a plain secret: the library takes its bytes
        ("whsec_" + base64.b64encode(b"k" * 24).decode(), None),  # Standard Webhooks' own form
    ],
    ids=["plain", "whsec"],
)
def test_a_standard_webhooks_library_verifies_our_deliveries(
    monkeypatch: pytest.MonkeyPatch, secret: str, receiver_key: bytes | None
) -> None:
    monkeypatch.setenv(env.WEBHOOK_SECRET, secret)
    with receiver() as peer:
        result = webhook.post_signed(
            f"http://127.0.0.1:{peer.port}/hook", {"event": "done", "ü": 1}, {}, "job-1"
        )
    assert result == {"status": 200}
    (request,) = peer.requests
    headers = dict(request.headers)
    library = Webhook(receiver_key if receiver_key is not None else secret)
    assert library.verify(request.body, headers) == {"event": "done", "ü": 1}
    assert signing.verify(secret, request.body, headers)
    assert request.one("webhook-id") == "job-1"
    assert request.one("Idempotency-Key") == "job-1"
    # the signature covers the id: the same body under another id is not ours
    assert not signing.verify(secret, request.body, {**headers, "webhook-id": "job-2"})


def test_user_headers_never_override_or_duplicate_the_signing_headers() -> None:
    forged = {
        "webhook-signature": "v1,Zm9yZ2Vk",
        "WEBHOOK-ID": "someone-else",
        "Webhook-Timestamp": "1",
        "idempotency-key": "dup",
        "Idempotency-Key": "dup2",
        "content-type": "text/plain",
        "X-App": "kept",
    }
    with receiver() as peer:
        webhook.post_signed(f"http://127.0.0.1:{peer.port}/", {"a": 1}, forged, "job-real")
    (request,) = peer.requests
    assert request.one("webhook-id") == "job-real"
    assert request.one("idempotency-key") == "job-real"
    assert request.one("content-type") == "application/json"
    assert request.one("webhook-timestamp") != "1"
    assert request.one("webhook-signature") != "v1,Zm9yZ2Vk"
    assert request.one("x-app") == "kept"
    assert signing.verify(WEBHOOK_SECRET, request.body, dict(request.headers))


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-signature": "v1,ünïcode"},
        {"webhook-signature": "v1,not base64!"},
        {"webhook-signature": "v2,AAAA"},
        {"webhook-signature": ""},
        {"webhook-timestamp": " +1700000000 "},
        {"webhook-timestamp": "1.7e9"},
        {"webhook-timestamp": "-1"},
        {"webhook-timestamp": "99999999999999999999999"},
        {"webhook-id": ""},
        {"webhook-id": "\udc00"},
        {"webhook-id": None},
    ],
)
def test_the_verifier_returns_false_and_never_raises_on_malformed_input(change: dict) -> None:
    body = b'{"a":1}'
    headers: dict[str, Any] = signing.sign("k", "m", body, timestamp=1_700_000_000)
    assert signing.verify("k", body, headers, now=1_700_000_000)
    headers.update(change)
    assert signing.verify("k", body, headers, now=1_700_000_000) is False


def test_the_verifier_refuses_an_empty_secret_and_documents_its_tolerance() -> None:
    body = b"{}"
    headers = signing.sign("k", "m", body, timestamp=1_700_000_000)
    for empty in ("", b"", "whsec_"):
        with pytest.raises(signing.EmptySecretError):
            signing.verify(empty, body, headers)
        with pytest.raises(signing.EmptySecretError):
            signing.sign(empty, "m", body)
    tolerance = signing.DEFAULT_TOLERANCE_SECONDS
    assert tolerance == 300 and "5 minutes" in (signing.__doc__ or "")
    assert signing.verify("k", body, headers, now=1_700_000_000 + tolerance)
    assert not signing.verify("k", body, headers, now=1_700_000_000 + tolerance + 1)
    assert not signing.verify("k", body, headers, now=1_700_000_000 - tolerance - 1)


# --- answers: capped, and kept out of errors ---------------------------------------------------


def test_a_receivers_answer_is_read_up_to_a_cap() -> None:
    with receiver(endless=True) as peer:
        started = time.monotonic()
        result = webhook.post_signed(f"http://127.0.0.1:{peer.port}/", {}, {}, "job-big")
        assert result == {"status": 200}
        assert time.monotonic() - started < 10  # 300 MB were on offer


def test_an_error_keeps_the_status_not_the_body() -> None:
    answer = b"internal-secret: redis password hunter2"
    with receiver(status=400, answer=answer) as peer, pytest.raises(PermanentError) as caught:
        webhook.post_signed(f"http://127.0.0.1:{peer.port}/", {}, {}, "job-400")
    assert "400" in str(caught.value)
    assert "hunter2" not in str(caught.value) and "internal-secret" not in str(caught.value)


# --- SSRF at delivery ---------------------------------------------------------------------------


def _loopback_name() -> str:
    """A host name (not 'localhost') that resolves to a private address on this machine."""
    name = socket.gethostname()
    try:
        address = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)[0][4][0]
    except OSError:
        pytest.skip(f"{name} does not resolve here")
    import ipaddress

    if ipaddress.ip_address(address).is_global:
        pytest.skip(f"{name} resolves to a public address")
    return name


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "127.1", "0x7f.0.0.1", "[::ffff:127.0.0.1]", "NAME", "localhost"],
)
def test_delivery_refuses_private_addresses_in_every_spelling_and_after_dns(
    monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    monkeypatch.delenv(env.WEBHOOK_ALLOW)
    host = _loopback_name() if host == "NAME" else host
    with receiver() as peer, pytest.raises(UnsafeURLError):
        webhook.post_signed(f"http://{host}:{peer.port}/", {}, {}, "job-ssrf")
    assert peer.requests == []


def test_an_allowed_name_is_reached_at_the_checked_address_with_its_own_host_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = _loopback_name()
    monkeypatch.setenv(env.WEBHOOK_ALLOW, name)
    with receiver() as peer:
        webhook.post_signed(f"http://{name}:{peer.port}/", {}, {}, "job-allowed")
    (request,) = peer.requests
    assert request.one("host") == f"{name}:{peer.port}"
    # allowing a name does not allow its address under another spelling
    with receiver() as peer, pytest.raises(UnsafeURLError):
        webhook.post_signed(f"http://127.0.0.1:{peer.port}/", {}, {}, "job-other")


def test_a_literal_private_url_is_refused_when_the_delivery_is_dispatched() -> None:
    from jobyard.job_engine import InvalidPayloadError, get_spec

    spec = get_spec("webhook.deliver")
    assert spec.http is False
    for url in ("http://169.254.169.254/latest", "http://[fd00::1]/", "http://10.0.0.5/"):
        with pytest.raises(InvalidPayloadError, match="refusing"):
            spec.encode({"url": url, "body": {}})


def test_derived_ids_always_fit_the_id_rule() -> None:
    for parent in ("a" * 200, "x" * 185, "tenant/7/" + "y" * 191, "z"):
        for suffix in (":webhook", ":event:succeeded", ":progress:12345", ":to-999", ":email-3"):
            derived = fit_job_id(parent + suffix)
            assert JOB_ID_RULE.fullmatch(derived), derived
            assert fit_job_id(parent + suffix) == derived  # stable: a retried step reuses it
    short = "order-1:webhook"
    assert fit_job_id(short) == short
    assert fit_job_id("a" * 195 + ":to-1") != fit_job_id("a" * 195 + ":to-2")


# --- through a real worker ----------------------------------------------------------------------


def test_a_real_worker_refuses_after_dns_and_delivers_long_id_webhooks(
    engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _loopback_name()
    monkeypatch.setenv(env.WEBHOOK_ALLOW, "localhost")  # by name: not the address, not `name`
    engines.start_worker()
    with receiver() as refused_peer, receiver(status=403, answer=b"hunter2") as error_peer:
        refused = engines.run(
            "dramatiq", "webhook.deliver", {"url": f"http://{name}:{refused_peer.port}/"}
        )
        errored = engines.run(
            "dramatiq", "webhook.deliver", {"url": f"http://localhost:{error_peer.port}/"}
        )
    assert (refused.state, refused.attempts) == ("failed", 1), refused
    assert "loopback" in (refused.error or "")
    assert refused_peer.requests == []
    assert errored.state == "failed" and "403" in (errored.error or "")
    assert "hunter2" not in (errored.error or "")

    long_id = "p" * 195  # a valid id whose derived event id would pass 200 characters
    with receiver() as peer:
        handle = engines.dispatch(
            "dramatiq", "system.echo", {"x": 1}, job_id=long_id,
            webhook_url=f"http://localhost:{peer.port}/done",
        )  # fmt: skip
        engines.wait(handle.job_id)
        deadline = time.monotonic() + 30
        while not peer.requests:
            assert time.monotonic() < deadline, engines.logs()
            time.sleep(0.1)
    (event,) = peer.requests
    assert JOB_ID_RULE.fullmatch(event.one("webhook-id"))
    assert Webhook(WEBHOOK_SECRET.encode()).verify(event.body, dict(event.headers))["job_id"] == (
        long_id
    )

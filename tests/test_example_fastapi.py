"""examples/fastapi_chat: the app in uvicorn, a real jobyard worker, the completion webhook, and
the page in Chromium (Debian's, driven by Playwright, as tests/api/test_dashboard.py does)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.test_dashboard import page  # noqa: F401 - the Chromium page fixture
from tests.engines import Engines
from tests.support import ROOT, free_port, start_engines_patiently, wait_for

EXAMPLE = ROOT / "examples" / "fastapi_chat"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def chat_app(engines: Engines, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    monkeypatch.setenv("JOBYARD_JOB_MODULES", "tests.jobs,chat_jobs")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{EXAMPLE}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("CHAT_PUBLIC_URL", url)
    monkeypatch.setenv("JOBYARD_WEBHOOK_ALLOW", "127.0.0.1")  # its webhook comes back here
    start_engines_patiently(engines, queues="default")
    log = tmp_path / "app.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)],
            cwd=EXAMPLE, env=dict(os.environ), stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            return f"Uvicorn running on {url}" in log.read_text()

        wait_for(up, timeout=90)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_send_answers_202_and_the_webhook_brings_the_reply(chat_app: str) -> None:
    sent = httpx.post(f"{chat_app}/api/chat/send", json={"message": "hello there"}, timeout=30)
    assert sent.status_code == 202, sent.text
    body = sent.json()
    assert body["engine"] == "dramatiq" and body["status_url"] == f"/api/chat/{body['job_id']}"

    def replied() -> dict | None:
        status = httpx.get(chat_app + body["status_url"], timeout=10).json()
        return status if status.get("via") == "webhook" else None

    status = wait_for(replied, timeout=60, interval=0.2)
    assert status["reply"] == "You said 2 words: 'ereht olleh' backwards."

    assert httpx.post(f"{chat_app}/api/chat/send", json={"message": ""}).status_code == 422
    assert httpx.get(f"{chat_app}/api/chat/no-such-job").status_code == 404
    forged = httpx.post(
        f"{chat_app}/api/hooks/jobyard",
        json={"job_id": "x", "name": "chat.reply", "event": "succeeded", "result": {"reply": "!"}},
        headers={"X-Jobyard-Timestamp": "1", "X-Jobyard-Signature": "sha256=00"},
    )
    assert forged.status_code == 401
    assert httpx.get(f"{chat_app}/api/chat/x").status_code == 404


def test_the_page_shows_the_reply_without_reloading(chat_app: str, page) -> None:  # noqa: F811
    from playwright.sync_api import expect

    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(chat_app)
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    page.fill("#message", "one two three")
    page.click("button[type=submit]")
    expect(page.locator("p.me")).to_have_text("one two three")
    expect(page.locator("p.reply")).to_have_text(
        "You said 3 words: 'eerht owt eno' backwards.", timeout=60_000
    )
    assert page.evaluate("window.loadedOnce") is True
    assert errors == []

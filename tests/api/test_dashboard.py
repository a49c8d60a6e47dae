"""The dashboard in a real browser: Debian's Chromium driven by Playwright (no Playwright browser
download). Chromium comes from `apt-get install -y --no-install-recommends chromium`; where it
is missing the test skips and says so."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import ApiServer, on_engine
from tests.api.jobs_api import ALLOW_FILE
from tests.engines import Engines

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
APT_LINE = "apt-get install -y --no-install-recommends chromium"


@pytest.fixture
def page() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing; install it with: {APT_LINE}"
        print(f"SKIP browser test: {reason}")
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api", reason="uv sync --group dev")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_dashboard_shows_a_dead_job_and_replays_it(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    page: Any,
) -> None:
    from playwright.sync_api import expect

    on_engine(engines, monkeypatch, "dramatiq")
    job_id = f"dashboard-{uuid.uuid4().hex[:8]}"
    response = api.client.post(
        "/jobs/api.flaky", json={"marker_dir": str(tmp_path)}, params={"job_id": job_id}
    )
    assert response.status_code == 202, response.text
    api.wait_for(job_id, lambda j: j["state"] in ("dead", "failed"), engines=engines)
    browser_errors: list[str] = []
    page.on("pageerror", lambda error: browser_errors.append(str(error)))
    # the CSP allows the page's own script and style only: a violation is a console error
    page.on(
        "console",
        lambda message: (
            "Content Security Policy" in message.text and browser_errors.append(message.text)
        ),
    )

    page.goto(f"{api.url}/dashboard")
    # without a token the panels say what is missing instead of failing silently
    expect(page.locator("#queues-note")).to_contain_text("admin token")
    expect(page.locator("#message")).to_contain_text("Enter a token")
    page.fill("#token", admin_token)
    page.click("#save-token")
    # this tab only: never localStorage, where any script of the origin finds it for good
    assert page.evaluate("sessionStorage.getItem('jobyard.token')") == admin_token
    assert page.evaluate("localStorage.length") == 0

    # admin panels: a queue row with its depth sparkline, the live worker
    expect(page.locator("#queues tr[data-queue='default'] svg polyline")).to_have_count(1)
    expect(page.locator("#workers tr")).to_have_count(1)

    dead_row = page.locator(f"#failed tr[data-job-id='{job_id}']")
    expect(dead_row).to_be_visible(timeout=15_000)  # the job log is written in batches
    expect(dead_row).to_contain_text("not allowed yet")

    dead_row.click()  # the detail shows what went wrong
    expect(page.locator("#detail-id")).to_have_text(job_id)
    expect(page.locator("#detail-error")).to_contain_text("not allowed yet")
    expect(page.locator("#detail-payload")).to_contain_text(str(tmp_path))
    expect(page.locator("#detail-steps")).to_contain_text("prepare")

    (tmp_path / ALLOW_FILE).touch()
    dead_row.locator("button.replay").click()

    expect(page.locator("#message")).to_contain_text(f"Replaying {job_id}")
    expect(page.locator("#detail-state")).to_have_text("succeeded", timeout=30_000)
    expect(page.locator("#detail-result")).to_contain_text("allowed")
    expect(page.locator(f"#failed tr[data-job-id='{job_id}']")).to_have_count(0, timeout=10_000)
    assert api.job(job_id)["state"] == "succeeded"
    assert browser_errors == []


def test_dashboard_cancels_a_queued_job_and_filters_by_state(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    page: Any,
) -> None:
    from playwright.sync_api import expect

    on_engine(engines, monkeypatch, "dramatiq")
    job_id = f"dashboard-queued-{uuid.uuid4().hex[:8]}"
    payload = {"marker_dir": str(tmp_path), "steps": 1, "seconds": 0}
    response = api.client.post(
        "/jobs/api.steps", json=payload, params={"job_id": job_id, "delay": 60}
    )
    assert response.status_code == 202, response.text

    # the link `jobyard dev` prints: the token in the fragment, taken out of the address at once
    page.goto(f"{api.url}/dashboard#token={admin_token}")
    assert page.evaluate("location.hash") == ""
    assert page.evaluate("sessionStorage.getItem('jobyard.token')") == admin_token
    page.select_option("#filter-state", "queued")
    row = page.locator(f"#jobs tr[data-job-id='{job_id}']")
    expect(row).to_be_visible(timeout=15_000)
    expect(page.locator("#queues tr[data-queue='default'] td").nth(4)).to_have_text("1")  # delayed

    row.locator("button.cancel").click()

    expect(page.locator("#detail-state")).to_have_text("cancelled", timeout=15_000)
    expect(row).to_have_count(0, timeout=10_000)  # filtered out: no longer queued
    page.select_option("#filter-state", "cancelled")
    expect(page.locator(f"#jobs tr[data-job-id='{job_id}']")).to_be_visible(timeout=10_000)
    assert api.job(job_id)["state"] == "cancelled"

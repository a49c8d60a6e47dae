"""The dashboard in a real browser: Debian's Chromium driven by Playwright (no Playwright browser
download). Chromium comes from `apt-get install -y --no-install-recommends chromium`; where it
is missing the test skips and says so.

Every panel is shown with real jobs run by real workers; each test writes a screenshot of its
view to tests/api/screenshots/ (git-ignored) for the next reader to look at."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import ApiServer, on_engine
from tests.api.jobs_api import ALLOW_FILE
from tests.api.test_lifecycle import dispatch
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
SCREENSHOTS = Path(__file__).parent / "screenshots"


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
            yield browser.new_page(viewport={"width": 1440, "height": 1000})
        finally:
            browser.close()


def watch_errors(page: Any) -> list[str]:
    """Page errors and CSP violations (the CSP allows the page's own script and style only)."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda message: "Content Security Policy" in message.text and errors.append(message.text),
    )
    return errors


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def wait_until(predicate: Any, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_token_entry_and_the_dev_link(api: ApiServer, admin_token: str, page: Any) -> None:
    """Without a token the panels say what is missing; the link `jobyard dev` prints
    (#token=...) logs the tab in and leaves the address bar at once."""
    from playwright.sync_api import expect

    errors = watch_errors(page)
    page.goto(f"{api.url}/dashboard")
    expect(page.locator("#queues-note")).to_contain_text("admin token")
    expect(page.locator("#message")).to_contain_text("Enter a token")
    page.fill("#token", admin_token)
    page.click("#save-token")
    # this tab only: never localStorage, where any script of the origin finds it for good
    assert page.evaluate("sessionStorage.getItem('jobyard.token')") == admin_token
    assert page.evaluate("localStorage.length") == 0
    expect(page.locator("#auth-status")).to_have_text("admin token accepted")

    page.goto("about:blank")
    page.goto(f"{api.url}/dashboard#token={admin_token}")
    assert page.evaluate("location.hash") in ("", "#/overview")
    assert page.evaluate("sessionStorage.getItem('jobyard.token')") == admin_token
    expect(page.locator("#auth-status")).to_have_text("admin token accepted")
    assert errors == []


def test_overview_shows_queues_workers_and_graphs_from_real_jobs(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    page: Any,
) -> None:
    from playwright.sync_api import expect

    on_engine(engines, monkeypatch, "dramatiq")
    ids = [dispatch(api, "api.steps", {"marker_dir": str(tmp_path), "steps": 1, "seconds": s})
           for s in (0, 0.2, 0.4, 0.6)]  # fmt: skip
    dead_dir = tmp_path / "dead"
    dead_dir.mkdir()
    ids.append(dispatch(api, "api.flaky", {"marker_dir": str(dead_dir)}))
    for job_id in ids:
        api.wait_for(job_id, lambda j: j["state"] in ("succeeded", "dead"), engines=engines)
    errors = watch_errors(page)

    page.goto(f"{api.url}/dashboard#token={admin_token}")

    expect(page.locator("#queues tr[data-queue='default'] svg polyline")).to_have_count(1)
    expect(page.locator("#queues tr[data-queue='default'] td").nth(6)).to_have_text("1")
    expect(page.locator("#workers tr")).to_have_count(1)
    card = page.locator(".graph-card[data-queue='default']")
    expect(card).to_contain_text("5 finished, 1 failed", timeout=20_000)
    throughput = card.locator("svg[data-metric='throughput']")
    expect(throughput.locator("rect.bar-ok").first).to_be_visible()
    expect(throughput.locator("rect.bar-bad")).not_to_have_count(0)
    # a value axis with units and a time axis with a date
    run = card.locator("svg[data-metric='run']")
    expect(run.locator("polyline.p50, circle.p50")).not_to_have_count(0)
    expect(run.locator("text").filter(has_text=" ms")).not_to_have_count(0)
    expect(run.locator("text").filter(has_text=time.strftime("%b"))).not_to_have_count(0)
    expect(card.locator("svg[data-metric='wait'] .p95")).not_to_have_count(0)
    page.select_option("#graph-window", "604800")
    expect(card).to_contain_text("5 finished")
    page.select_option("#graph-window", "3600")
    screenshot(page, "overview")
    assert errors == []


def test_jobs_list_pages_filters_and_searches(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    page: Any,
) -> None:
    from playwright.sync_api import expect

    on_engine(engines, monkeypatch, "dramatiq")
    payload = {"marker_dir": str(tmp_path), "steps": 1, "seconds": 0}
    ids = [dispatch(api, "api.steps", payload) for _ in range(53)]
    on_engine(engines, monkeypatch, "temporal")
    on_temporal = dispatch(api, "api.steps", payload)
    for job_id in [*ids, on_temporal]:
        api.wait_for(job_id, lambda j: j["state"] == "succeeded", engines=engines)
    wait_until(lambda: len(api.client.get("/jobs", params={"limit": 500}).json()) == 54)
    errors = watch_errors(page)

    page.goto(f"{api.url}/dashboard#token={admin_token}")
    page.click("nav a[data-view='jobs']")

    rows = page.locator("#jobs tr")
    expect(rows).to_have_count(50)
    expect(page.locator("#page-label")).to_have_text("page 1")
    expect(rows.first).to_contain_text(on_temporal)  # newest first
    screenshot(page, "jobs")
    page.click("#page-next")
    expect(page.locator("#page-label")).to_have_text("page 2")
    expect(rows).to_have_count(4)
    expect(page.locator("#page-next")).to_be_disabled()
    seen = set(page.locator("#jobs tr").evaluate_all("rows => rows.map(r => r.dataset.jobId)"))
    page.click("#page-prev")
    expect(rows).to_have_count(50)
    seen |= set(page.locator("#jobs tr").evaluate_all("rows => rows.map(r => r.dataset.jobId)"))
    assert seen == {*ids, on_temporal}  # every job once across the pages

    page.select_option("#filter-engine", "temporal")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(on_temporal)
    page.select_option("#filter-engine", "")
    page.fill("#filter-id", ids[7])
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(ids[7])
    page.click("#filter-clear")
    page.select_option("#filter-state", "failed")
    expect(page.locator("#jobs-note")).to_have_text("No job matches.")
    page.click("#filter-clear")
    page.fill("#filter-since", "2020-01-01T00:00")
    page.fill("#filter-until", "2020-01-02T00:00")
    page.locator("#filter-until").dispatch_event("change")
    expect(page.locator("#jobs-note")).to_have_text("No job matches.")
    page.click("#filter-clear")
    expect(rows).to_have_count(50)

    rows.filter(has_text=on_temporal).click()  # the job page, with the fallback reason
    expect(page.locator("#detail-id")).to_have_text(on_temporal)
    expect(page.locator("#detail-fields dd[data-field='fallback reason']")).to_have_text("flag_off")
    expect(page.locator("#detail-timeline tr[data-engine='temporal']")).to_have_count(1)
    assert errors == []


def test_job_page_follows_progress_live(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    page: Any,
) -> None:
    from playwright.sync_api import expect

    on_engine(engines, monkeypatch, "dramatiq")
    page.goto(f"{api.url}/dashboard#token={admin_token}")
    errors = watch_errors(page)
    payload = {"marker_dir": str(tmp_path), "steps": 4, "seconds": 1.2}
    job_id = dispatch(api, "api.steps", payload)

    page.goto(f"{api.url}/dashboard#/job/{job_id}")

    expect(page.locator("#detail-id")).to_have_text(job_id)
    expect(page.locator("#detail-payload")).to_contain_text(str(tmp_path))
    # progress arrives from the event stream while the job still runs
    expect(page.locator("#detail-progress-text")).to_have_text("50%", timeout=20_000)
    assert api.job(job_id)["state"] == "running"
    expect(page.locator("#detail-stream")).to_have_text("live")
    expect(page.locator("#detail-state")).to_have_text("running")
    screenshot(page, "job-running")
    expect(page.locator("#detail-state")).to_have_text("succeeded", timeout=30_000)
    expect(page.locator("#detail-progress-text")).to_have_text("100%")
    expect(page.locator("#detail-stream")).to_have_text("finished")
    progress = page.locator("#detail-events li[data-kind='progress']")
    expect(progress).to_have_count(4)
    seqs = page.locator("#detail-events li").evaluate_all("items => items.map(i => +i.dataset.seq)")
    assert seqs == list(range(1, len(seqs) + 1))  # each event once, in order
    expect(page.locator("#detail-result")).to_contain_text('"steps": 4')
    steps = page.locator("#detail-timeline tr[data-engine='dramatiq']")
    expect(steps).to_have_count(4)
    expect(steps.first).to_contain_text("step-0")
    expect(steps.first.locator("td").nth(3)).to_contain_text(" s")  # ~1.2 s
    expect(page.locator("#detail-timeline-chart svg rect")).to_have_count(4)
    screenshot(page, "job-finished")
    assert errors == []


def test_a_sleeping_job_reads_as_sleeping(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    page: Any,
) -> None:
    from playwright.sync_api import expect

    on_engine(engines, monkeypatch, "temporal")
    job_id = dispatch(api, "api.nap", {"marker_dir": str(tmp_path), "nap": 20})
    api.wait_for(job_id, lambda j: j["display_state"] == "sleeping", engines=engines)

    page.goto(f"{api.url}/dashboard#token={admin_token}")
    page.goto(f"{api.url}/dashboard#/jobs")
    row = page.locator(f"#jobs tr[data-job-id='{job_id}']")
    expect(row).to_contain_text("sleeping", timeout=10_000)
    expect(row).to_contain_text("wakes")
    row.click()
    expect(page.locator("#detail-state")).to_have_text("sleeping")
    expect(page.locator("#detail-run-at")).to_contain_text("wakes")
    expect(page.locator("#detail-events")).to_contain_text("sleeping until")
    screenshot(page, "job-sleeping")
    api.client.delete(f"/jobs/{job_id}", headers=api.admin(admin_token))


def test_dead_letters_replay_several_then_all_matching(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    admin_token: str,
    page: Any,
) -> None:
    from playwright.sync_api import expect

    on_engine(engines, monkeypatch, "dramatiq")
    dirs = [tmp_path / f"job{n}" for n in range(3)]
    ids = []
    for directory in dirs:
        directory.mkdir()
        ids.append(dispatch(api, "api.flaky", {"marker_dir": str(directory)}))
    for job_id in ids:
        api.wait_for(job_id, lambda j: j["state"] == "dead", engines=engines)
    errors = watch_errors(page)

    page.goto(f"{api.url}/dashboard#token={admin_token}")
    page.goto(f"{api.url}/dashboard#/dead")
    for job_id in ids:
        row = page.locator(f"#failed tr[data-job-id='{job_id}']")
        expect(row).to_be_visible(timeout=15_000)  # the job log is written in batches
        expect(row).to_contain_text("not allowed yet")
    screenshot(page, "dead-letters")
    for directory in dirs:
        (directory / ALLOW_FILE).touch()

    for job_id in ids[:2]:
        page.locator(f"#failed input.pick[data-job-id='{job_id}']").check()
    expect(page.locator("#replay-selected")).to_have_text("Replay selected (2)")
    page.click("#replay-selected")

    expect(page.locator("#message")).to_contain_text("Replaying 2 job(s)")
    for job_id in ids[:2]:
        api.wait_for(job_id, lambda j: j["state"] == "succeeded", engines=engines)
        expect(page.locator(f"#failed tr[data-job-id='{job_id}']")).to_have_count(0)
    assert api.job(ids[2])["state"] == "dead"
    expect(page.locator(f"#failed tr[data-job-id='{ids[2]}']")).to_be_visible()

    page.fill("#dead-name", "api.flaky")
    page.click("#replay-matching")
    expect(page.locator("#message")).to_contain_text("Replaying all 1 dead job(s)")
    api.wait_for(ids[2], lambda j: j["state"] == "succeeded", engines=engines)
    expect(page.locator("#dead-note")).to_have_text("No dead letters.", timeout=15_000)

    # the job page of a replayed job: its last error is history now
    page.goto(f"{api.url}/dashboard#/job/{ids[0]}")
    expect(page.locator("#detail-state")).to_have_text("succeeded")
    expect(page.locator("#detail-error-title")).to_contain_text("before it succeeded")
    assert errors == []


def test_cancel_a_delayed_job_from_its_page(
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

    page.goto(f"{api.url}/dashboard#token={admin_token}")
    expect(page.locator("#queues tr[data-queue='default'] td").nth(4)).to_have_text("1")  # delayed
    page.goto(f"{api.url}/dashboard#/jobs")
    page.select_option("#filter-state", "queued")
    row = page.locator(f"#jobs tr[data-job-id='{job_id}']")
    expect(row).to_contain_text("delayed", timeout=15_000)
    expect(row).to_contain_text("starts")

    row.locator("button.cancel").click()

    expect(row).to_have_count(0, timeout=10_000)  # filtered out: no longer queued
    page.select_option("#filter-state", "cancelled")
    expect(page.locator(f"#jobs tr[data-job-id='{job_id}']")).to_be_visible(timeout=10_000)
    assert api.job(job_id)["state"] == "cancelled"


def test_the_dashboard_works_in_jobyard_dev_with_the_link_it_prints(
    jobyard_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    page: Any,
) -> None:
    """A new user's first look: `jobyard dev` with no token set makes one and prints the
    dashboard's link with it; that link shows the live system and the jobs, nothing to type."""
    import re

    from playwright.sync_api import expect

    from jobyard.dispatcher import dispatch_job
    from jobyard.job_engine import env
    from tests.support import free_port
    from tests.test_dev import stop_dev

    monkeypatch.delenv(env.ADMIN_TOKEN, raising=False)
    monkeypatch.delenv(env.API_TOKEN, raising=False)
    port = free_port()
    proc, log = _start_dev_with_api(tmp_path, port)
    try:
        wait_until(lambda: "running; Ctrl-C to stop" in log.read_text(), 150, log.read_text())
        match = re.search(r"dashboard: (http://\S+/dashboard#token=\S+)", log.read_text())
        assert match, log.read_text()
        handle = dispatch_job("system.echo", {"hello": "dev"})
        # dev says "running" once its children started; the API may still be binding its port
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/health"), 60, log.read_text())

        page.goto(match.group(1))

        expect(page.locator("#auth-status")).to_have_text("admin token accepted")
        expect(page.locator("#workers tr")).not_to_have_count(0)
        expect(page.locator("#queues tr[data-queue='default']")).to_be_visible()
        screenshot(page, "dev-overview")
        page.click("nav a[data-view='jobs']")
        row = page.locator(f"#jobs tr[data-job-id='{handle.job_id}']")
        expect(row).to_contain_text("succeeded", timeout=20_000)
        row.click()
        expect(page.locator("#detail-result")).to_contain_text('"hello": "dev"')
    finally:
        assert stop_dev(proc) == 0, log.read_text()


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def _start_dev_with_api(tmp_path: Path, port: int) -> tuple[Any, Path]:
    import subprocess
    import sys

    log = tmp_path / "dev-api.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobyard.cli", "dev", "--no-canary", "--api-port", str(port)],
            env=dict(os.environ), cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return proc, log

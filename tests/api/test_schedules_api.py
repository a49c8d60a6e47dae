"""The schedules' admin routes: closed without the admin token; list, pause, resume, trigger and
backfill with it (the same operations as `jobyard schedules`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobyard.job_engine import env
from jobyard.job_engine.schedules import env_key
from tests.api.conftest import JOB_MODULES, ApiServer
from tests.api.test_dashboard import SCREENSHOTS, page  # noqa: F401 - the Chromium page fixture


@pytest.fixture
def schedules_api(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> ApiServer:
    monkeypatch.setenv(env.JOB_MODULES, f"{JOB_MODULES},tests.schedule_jobs")
    monkeypatch.setenv(env.USE_DRAMATIQ, "false")  # triggered jobs go to Temporal; none runs
    for name in ("maintenance.file_cleanup", "analytics.weekly_report"):
        monkeypatch.setenv(env_key(name), "off")
    return api


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/schedules"), ("POST", "/schedules/test.every2/pause"),
     ("POST", "/schedules/test.every2/trigger")],
)  # fmt: skip
def test_schedule_routes_need_the_admin_token(
    schedules_api: ApiServer, monkeypatch: pytest.MonkeyPatch, method: str, path: str
) -> None:
    monkeypatch.delenv(env.ADMIN_TOKEN, raising=False)
    assert schedules_api.client.request(method, path).status_code == 403
    monkeypatch.setenv(env.ADMIN_TOKEN, "right")
    wrong = {"Authorization": "Bearer wrong"}
    assert schedules_api.client.request(method, path, headers=wrong).status_code == 401


def test_list_pause_resume_trigger_backfill_over_http(
    schedules_api: ApiServer, admin_token: str
) -> None:
    client, headers = schedules_api.client, schedules_api.admin(admin_token)

    listed = client.get("/schedules", headers=headers)
    assert listed.status_code == 200, listed.text
    by_name = {item["name"]: item for item in listed.json()}
    assert by_name["analytics.daily_report"]["spec"] == "0 6 * * *"
    assert by_name["analytics.weekly_report"]["enabled"] is False  # switched off by env
    assert by_name["analytics.weekly_report"]["next_fire"] is None
    assert by_name["test.every2"]["paused"] is False

    assert client.post("/schedules/test.every2/pause", headers=headers).json()["paused"] is True
    item = next(
        i for i in client.get("/schedules", headers=headers).json() if i["name"] == "test.every2"
    )
    assert item["paused"] is True and item["next_fire"] is None
    assert client.post("/schedules/test.every2/resume", headers=headers).json()["paused"] is False

    triggered = client.post("/schedules/test.every2/trigger", headers=headers)
    assert triggered.status_code == 202, triggered.text
    assert triggered.json()["job_id"].startswith("schedule:test.every2:manual:")
    assert triggered.json()["outcome"] == "fired"
    item = next(
        i for i in client.get("/schedules", headers=headers).json() if i["name"] == "test.every2"
    )
    assert item["fired"] == 1 and item["last_job_state"] in ("queued", "running")

    end = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    body = {"start": (end - timedelta(seconds=5)).isoformat(), "end": end.isoformat()}
    first = client.post("/schedules/test.every2/backfill", headers=headers, json=body)
    assert first.status_code == 202, first.text
    assert first.json()["ticks"] == 3 and len(first.json()["jobs"]) == 3
    again = client.post("/schedules/test.every2/backfill", headers=headers, json=body).json()
    assert again["already_fired"] == 3 and again["jobs"] == {}

    backwards = {"start": body["end"], "end": body["start"]}
    response = client.post("/schedules/test.every2/backfill", headers=headers, json=backwards)
    assert response.status_code == 422 and "start must not be after end" in response.text
    naive = {"start": "2026-01-01T00:00:00", "end": "2026-01-01T00:01:00"}
    assert (
        client.post("/schedules/test.every2/backfill", headers=headers, json=naive).status_code
        == 422
    )
    assert client.post("/schedules/no.such/pause", headers=headers).status_code == 404


def test_dashboard_schedules_panel_pauses_and_resumes(
    schedules_api: ApiServer,
    admin_token: str,
    page: Any,  # noqa: F811 - the fixture
) -> None:
    from playwright.sync_api import expect

    browser_errors: list[str] = []
    page.on("pageerror", lambda error: browser_errors.append(str(error)))
    page.goto(f"{schedules_api.url}/dashboard#/schedules")
    expect(page.locator("#schedules-note")).to_contain_text("admin token")
    page.fill("#token", admin_token)
    page.click("#save-token")
    page.reload()  # the panel polls every 5 s; a reload shows it at once
    row = page.locator("#schedules tr[data-schedule='test.every2']")
    expect(row).to_contain_text("every 2s")
    expect(row).to_contain_text("active")
    expect(page.locator("#schedules tr[data-schedule='analytics.weekly_report']")).to_contain_text(
        "off"
    )
    row.get_by_role("button", name="Pause").click()
    expect(row).to_contain_text("paused")
    listed = schedules_api.client.get("/schedules", headers=schedules_api.admin(admin_token))
    assert next(i for i in listed.json() if i["name"] == "test.every2")["paused"] is True
    row.get_by_role("button", name="Resume").click()
    expect(row).to_contain_text("active")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "schedules.png"), full_page=True)
    assert browser_errors == []

"""A job's related jobs over HTTP and on the dashboard (issue 30, item 5): the children a job
started and the jobs it was dispatched after, in `GET /jobs/{id}` and on the timeline's steps,
each a link on the job's page; on both engines (a Temporal job's steps come from the journal)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from jobyard.job_engine.children import child_job_id
from tests.api.conftest import ApiServer, on_engine
from tests.api.jobs_api import ALLOW_FILE
from tests.api.test_dashboard import page, watch_errors  # noqa: F401 (a fixture)
from tests.api.test_events import read_stream
from tests.api.test_lifecycle import dispatch
from tests.engines import Engines

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_children_and_upstream_in_the_detail_and_the_timeline(
    api: ApiServer, engines: Engines, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    on_engine(engines, monkeypatch, engine)
    parent = dispatch(api, "api.fan", {"n": 3})
    detail = api.wait_for(parent, lambda j: j["state"] == "succeeded", 90, engines=engines)
    children = [child_job_id(parent, 1, i, None) for i in range(3)]
    assert detail["result"] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert (detail["children"], detail["children_count"], detail["upstream"]) == (
        children, 3, [],
    )  # fmt: skip
    timeline = api.client.get(f"/jobs/{parent}/timeline").json()
    started = [e for e in timeline if e.get("children")]
    assert [e["children"] for e in started] == [children], timeline

    after = dispatch(api, "system.echo", {"n": 1}, after=[parent])
    detail = api.wait_for(after, lambda j: j["state"] == "succeeded", 90, engines=engines)
    assert (detail["upstream"], detail["children"]) == ([parent], [])
    for child in children:  # a child has no children, and knows no upstream
        assert api.job(child)["children"] == []


def test_the_job_page_links_children_and_upstream(
    api: ApiServer,
    engines: Engines,
    monkeypatch: pytest.MonkeyPatch,
    admin_token: str,
    page: Any,  # noqa: F811
) -> None:
    from playwright.sync_api import expect

    on_engine(engines, monkeypatch, "dramatiq")
    parent = dispatch(api, "api.fan", {"n": 2})
    api.wait_for(parent, lambda j: j["state"] == "succeeded", 90, engines=engines)
    after = dispatch(api, "system.echo", {"n": 1}, after=[parent])
    api.wait_for(after, lambda j: j["state"] == "succeeded", 90, engines=engines)
    page.goto(f"{api.url}/dashboard#token={admin_token}")
    errors = watch_errors(page)

    page.goto(f"{api.url}/dashboard#/job/{after}")
    expect(page.locator("#detail-id")).to_have_text(after)
    upstream = page.locator("#detail-related dd[data-field='upstream'] a")
    expect(upstream).to_have_text([parent])
    upstream.first.click()
    expect(page.locator("#detail-id")).to_have_text(parent)
    links = page.locator("#detail-related dd[data-field='children'] a")
    expect(links).to_have_text([child_job_id(parent, 1, i, None) for i in range(2)])
    expect(page.locator("#detail-timeline tr a")).to_have_count(2)  # on the start step's row
    links.nth(1).click()
    expect(page.locator("#detail-id")).to_have_text(child_job_id(parent, 1, 1, None))
    expect(page.locator("#detail-state")).to_have_text("succeeded")
    assert errors == []


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_a_waiting_parent_says_so_in_its_event_stream(
    api: ApiServer, engines: Engines, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, engine: str
) -> None:
    on_engine(engines, monkeypatch, engine)
    parent = dispatch(api, "api.gated_parent", {"marker_dir": str(tmp_path)})
    waiting = read_stream(
        api, parent, stop_after=lambda e: str(e.get("display_state")).startswith("waiting")
    )
    assert waiting[-1]["display_state"] == "waiting for 1 child", waiting
    assert child_job_id(parent, 1, 0, None) in waiting[-1]["waiting_reason"], waiting
    time.sleep(2.5)  # several looks: the story keeps the first only
    (tmp_path / ALLOW_FILE).touch()
    detail = api.wait_for(parent, lambda j: j["state"] == "succeeded", 90, engines=engines)
    assert detail["result"] is True
    story = read_stream(api, parent)
    shown = [e for e in story if str(e.get("display_state")).startswith("waiting")]
    assert len(shown) == 1, story
    assert [e["state"] for e in story if e["kind"] == "state"][-1] == "succeeded", story

"""The engine-neutral parts of a job's waits (jobyard.job_engine.waits): how the looks are spaced,
what a waiting job shows, and that the API keeps it."""

from __future__ import annotations

import pytest

from jobyard.api.views import readable
from jobyard.dispatcher.submission import check_after
from jobyard.job_engine import env
from jobyard.job_engine.children import child_ids, child_job_id
from jobyard.job_engine.waits import (
    FIRST_LOOK,
    is_waiting,
    next_look,
    waiting_for_children,
    waiting_for_event,
    waiting_for_upstream,
)


def test_looks_start_fast_and_thin_out_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    assert next_look(0) == FIRST_LOOK
    assert next_look(30) == pytest.approx(3.0)
    assert next_look(10_000) == 10.0  # JOBYARD_WAIT_POLL_MAX's default
    monkeypatch.setenv(env.WAIT_POLL_MAX, "2")
    assert next_look(10_000) == 2.0


def test_what_a_waiting_job_shows() -> None:
    three = waiting_for_children(["p:child1-0", "p:child1-1", "p:child1-2", "p:child1-3"])
    assert three.display_state == "waiting for 4 children"
    assert three.waiting_reason == "children p:child1-0, p:child1-1, p:child1-2 and 1 more"
    assert waiting_for_children(["p:child:a"]).display_state == "waiting for 1 child"
    assert waiting_for_upstream(["a", "b"]).display_state == "waiting for 2 jobs"
    event = waiting_for_event("payment.confirmed", {"order_id": 42}, 3600)
    assert event.display_state == "waiting for payment.confirmed"
    assert (
        event.waiting_reason
        == 'event payment.confirmed matching {"order_id": 42} (for up to 3600s)'
    )
    assert is_waiting(event.display_state, "running")
    assert not is_waiting(event.display_state, "succeeded") and not is_waiting(
        "sleeping", "running"
    )


def test_the_api_keeps_a_waits_display_state() -> None:
    job = {"state": "running", "display_state": "waiting for 3 children", "run_at": None}
    assert readable(job)["display_state"] == "waiting for 3 children"
    assert readable({"state": "running", "run_at": None})["display_state"] == "running"


def test_child_ids_come_back_from_a_fan_outs_record() -> None:
    record = {"count": 3, "keyed": {"1": "invoice"}}
    assert child_ids("p", 2, record) == ["p:child2-0", "p:child:invoice", "p:child2-2"]
    long = child_job_id("x" * 199, 1, 0, None)  # past 200 characters: cut, with a digest
    assert len(long) <= 200 and long.endswith(":child1-0")


@pytest.mark.parametrize(
    ("after", "failure", "error"),
    [
        ("job-1", "cancel", "a list of job ids"),
        ([{"id": 1}], "cancel", "is not a job id"),
        (["bad id!"], "cancel", "is not a job id"),
        (["a"], "maybe", "after_failure"),
    ],
)
def test_a_bad_after_is_a_value_error(after, failure, error) -> None:
    with pytest.raises(ValueError, match=error):
        check_after(after, failure)


def test_after_is_deduped_and_empty_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_after(["a", "b", "a"], "run") == {"ids": ["a", "b"], "on_failure": "run"}
    assert check_after([], "cancel") is None and check_after(None, "cancel") is None
    monkeypatch.setenv(env.MAX_CHILDREN, "2")
    with pytest.raises(ValueError, match="JOBYARD_MAX_CHILDREN allows 2"):
        check_after(["a", "b", "c"], "cancel")

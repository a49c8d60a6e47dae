"""analytics.daily_report / analytics.weekly_report on the in-process engine, against real
PostgreSQL and SQLite `job_log` rows; child e-mails captured at the dispatcher hook."""

from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import insert, select

from jobyard.job_engine import db, env
from jobyard.job_engine.db.models import JobLog, JobReport
from jobyard.job_engine.errors import InvalidPayloadError, PermanentError
from jobyard.job_engine.inline import run_inline
from jobyard.job_engine.jobs.analytics import percentile
from jobyard.job_engine.registry import get_spec

if TYPE_CHECKING:
    from conftest import ChildRecorder

DAY = date(2024, 3, 4)  # a Monday; ISO week 2024-W10
PLUS2 = timezone(timedelta(hours=2))

ECHO, HOOK, REPORT = "system.echo", "webhook.deliver", "analytics.daily_report"
DQ, TP = "dramatiq", "temporal"


def t(
    day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0, tz: tzinfo = UTC
) -> datetime:
    """An instant in March 2024."""
    return datetime(2024, 3, day, hour, minute, second, micro, tzinfo=tz)


# (name, queue, engine, state, duration_ms, finished_at) — all inside DAY (UTC)
IN_DAY: list[tuple[str, str, str, str, int | None, datetime]] = [
    (ECHO, "default", DQ, "succeeded", 10, t(4)),
    (ECHO, "default", DQ, "succeeded", 40, t(4, 1)),
    (ECHO, "default", DQ, "succeeded", 20, t(4, 2)),
    (ECHO, "default", DQ, "succeeded", 1000, t(4, 9)),
    (ECHO, "default", DQ, "succeeded", 30, t(4, 23, 59, 59, 999999)),
    (ECHO, "default", TP, "succeeded", 5, t(5, 1, tz=PLUS2)),  # 23:00 UTC on the 4th
    (HOOK, "default", DQ, "failed", 100, t(4, 12)),
    (HOOK, "default", DQ, "failed", 300, t(4, 13)),
    (HOOK, "default", DQ, "failed", None, t(4, 14)),
    (HOOK, "default", DQ, "dead", 700, t(4, 15)),
    (REPORT, "data-sync", TP, "cancelled", None, t(4, 16)),
]

OUT_OF_DAY = [
    (ECHO, "default", DQ, "succeeded", 99999, t(5)),
    (ECHO, "default", DQ, "succeeded", 99999, t(3, 23, 59, 59, 999999)),
    (ECHO, "default", DQ, "failed", 99999, t(4, 0, 30, tz=PLUS2)),  # 22:30 UTC on the 3rd
]


def _add_log(rows: list[tuple[Any, ...]], prefix: str = "job") -> None:
    values = [
        {
            "job_id": f"{prefix}-{i}",
            "name": name,
            "queue": queue,
            "engine": engine,
            "state": state,
            "attempts": 1,
            "duration_ms": duration,
            "finished_at": finished,
            "started_at": None if finished is None else finished - timedelta(seconds=1),
        }
        for i, (name, queue, engine, state, duration, finished) in enumerate(rows)
    ]
    with db.session_scope() as session:
        session.execute(insert(JobLog), values)


def _expected_stats(durations: list[int | None]) -> dict[str, Any]:
    """An independent oracle: the standard library's statistics module."""
    values = sorted(d for d in durations if d is not None)
    if not values:
        return {"count": len(durations), "avg_ms": None, "p50_ms": None, "p95_ms": None,
                "max_ms": None}  # fmt: skip
    if len(values) == 1:
        p95 = values[0]
    else:
        p95 = statistics.quantiles(values, n=20, method="inclusive")[18]
    return {
        "count": len(durations),
        "avg_ms": round(statistics.fmean(values), 3),
        "p50_ms": round(float(statistics.median(values)), 3),
        "p95_ms": round(float(p95), 3),
        "max_ms": values[-1],
    }


def _expected_groups(
    rows: list[tuple[Any, ...]], keys: tuple[int, ...], names: tuple[str, ...]
) -> list[dict[str, Any]]:
    grouped: dict[tuple, list] = defaultdict(list)
    for row in rows:
        grouped[tuple(row[k] for k in keys)].append(row[4])
    return [
        {**dict(zip(names, group, strict=True)), **_expected_stats(durations)}
        for group, durations in sorted(grouped.items())
    ]


def _stored_reports() -> list[JobReport]:
    with db.session_scope() as session:
        return list(session.scalars(select(JobReport).order_by(JobReport.id)))


def test_report_declarations() -> None:
    daily, weekly = get_spec("analytics.daily_report"), get_spec("analytics.weekly_report")
    assert (daily.queue, daily.retry.attempts, daily.retry.backoff, daily.timeout) == (
        "data-sync", 2, 60, 600,
    )  # fmt: skip
    assert (weekly.queue, weekly.retry.attempts, weekly.retry.backoff, weekly.timeout) == (
        "data-sync", 2, 3600, 600,
    )  # fmt: skip


def test_daily_report_aggregates_the_day(database: str) -> None:
    _add_log(IN_DAY, "in")
    _add_log(OUT_OF_DAY, "out")
    _add_log([(ECHO, "default", DQ, "running", None, None)], "unfinished")

    result = run_inline("analytics.daily_report", {"period_start": "2024-03-04"}, job_id="r1")

    [report] = _stored_reports()
    assert result == {
        "report_id": report.id,
        "kind": "daily",
        "period_start": "2024-03-04",
        "period_end": "2024-03-05",
        "total": len(IN_DAY),
        "emails": [],
    }
    assert (report.kind, report.period_start, report.period_end) == (
        "daily", DAY, date(2024, 3, 5),
    )  # fmt: skip
    data = report.data
    all_keys = ("name", "queue", "engine", "state")
    assert data["groups"] == _expected_groups(IN_DAY, (0, 1, 2, 3), all_keys)
    assert data["by_name"] == _expected_groups(IN_DAY, (0,), ("name",))
    assert data["by_state"] == _expected_groups(IN_DAY, (3,), ("state",))
    assert data["by_engine"] == _expected_groups(IN_DAY, (2,), ("engine",))
    assert data["total"] == _expected_stats([row[4] for row in IN_DAY])
    # Spot-check the oracle itself on the busiest group: 10, 20, 30, 40, 1000.
    echo = data["groups"][1]
    assert (echo["name"], echo["engine"], echo["count"]) == ("system.echo", "dramatiq", 5)
    assert (echo["avg_ms"], echo["p50_ms"], echo["p95_ms"], echo["max_ms"]) == (220, 30, 808, 1000)
    webhook_failed = next(g for g in data["groups"] if g["state"] == "failed")
    assert (webhook_failed["count"], webhook_failed["avg_ms"]) == (3, 200)  # a null duration counts


def test_rerun_replaces_the_report_instead_of_adding_one(database: str) -> None:
    _add_log(IN_DAY[:3], "first")
    first = run_inline("analytics.daily_report", {"period_start": "2024-03-04"})
    _add_log(IN_DAY[3:], "late")
    second = run_inline("analytics.daily_report", {"period_start": "2024-03-04"})

    [report] = _stored_reports()
    assert first["report_id"] == second["report_id"] == report.id
    assert (first["total"], second["total"]) == (3, len(IN_DAY))
    assert report.data["total"]["count"] == len(IN_DAY)

    weekly = run_inline("analytics.weekly_report", {"period_start": "2024-03-04"})
    assert weekly["report_id"] != report.id  # another kind, same start: its own row
    assert len(_stored_reports()) == 2


def test_empty_period(database: str) -> None:
    result = run_inline("analytics.daily_report", {"period_start": "2020-01-01"})
    [report] = _stored_reports()
    assert result["total"] == 0
    assert report.data["total"] == {
        "count": 0, "avg_ms": None, "p50_ms": None, "p95_ms": None, "max_ms": None,
    }  # fmt: skip
    assert report.data["groups"] == [] and report.data["by_name"] == []


def test_weekly_report_covers_the_iso_week(database: str) -> None:
    week = [
        (ECHO, "default", DQ, "succeeded", 1, t(4)),
        (ECHO, "default", DQ, "succeeded", 2, t(7, 12)),
        (ECHO, "default", DQ, "succeeded", 3, t(10, 23, 59)),
    ]
    outside = [
        (ECHO, "default", DQ, "succeeded", 9, t(11)),
        (ECHO, "default", DQ, "succeeded", 9, t(3, 23, 59)),
    ]
    _add_log(week, "in")
    _add_log(outside, "out")

    result = run_inline("analytics.weekly_report", {"period_start": "2024-03-04"})

    assert (result["period_start"], result["period_end"], result["total"]) == (
        "2024-03-04", "2024-03-11", 3,
    )  # fmt: skip
    [report] = _stored_reports()
    assert report.kind == "weekly"
    assert report.data["total"] == _expected_stats([1, 2, 3])


def test_default_periods_are_yesterday_and_last_iso_week(database: str) -> None:
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    last_monday = today - timedelta(days=today.weekday() + 7)
    thursday = last_monday + timedelta(days=3)
    _add_log(
        [
            (ECHO, "default", DQ, "succeeded", 1, datetime.combine(d, time(12), tzinfo=UTC))
            for d in (yesterday, thursday, today)
        ]
    )

    daily = run_inline("analytics.daily_report", {})
    weekly = run_inline("analytics.weekly_report", {})

    assert daily["period_start"] == yesterday.isoformat()
    assert daily["period_end"] == today.isoformat()
    assert weekly["period_start"] == last_monday.isoformat()
    assert weekly["period_end"] == (last_monday + timedelta(days=7)).isoformat()
    assert date.fromisoformat(weekly["period_start"]).isoweekday() == 1
    expected_daily = 2 if yesterday == thursday else 1
    assert daily["total"] == expected_daily
    assert weekly["total"] == 1 + (last_monday <= yesterday < last_monday + timedelta(days=7))


def test_one_email_child_per_recipient_with_stable_ids(
    database: str, child_dispatches: ChildRecorder
) -> None:
    _add_log(IN_DAY, "in")
    payload = {
        "period_start": "2024-03-04",
        "recipients": ["ops@example.com", "cto@example.com", "OPS@example.com"],
    }

    result = run_inline("analytics.daily_report", payload, job_id="report-42")

    [report] = _stored_reports()
    assert [c["job_id"] for c in child_dispatches.calls] == [
        "report-42:email-0",
        "report-42:email-1",
    ]
    assert result["emails"] == [
        {"job_id": "report-42:email-0", "engine": "recorded"},
        {"job_id": "report-42:email-1", "engine": "recorded"},
    ]
    addresses = ["ops@example.com", "cto@example.com"]
    for call, address in zip(child_dispatches.calls, addresses, strict=True):
        assert call["name"] == "email.send"
        assert call["payload"] == {
            "to": address,
            "subject": "jobyard daily report: 2024-03-04",
            "template": "report",
            "context": {"report": report.data},
        }

    # A retry of the same job (same id) asks for the same children, so none starts twice.
    run_inline("analytics.daily_report", payload, job_id="report-42")
    assert len(child_dispatches.calls) == 4
    assert sorted(child_dispatches.started) == ["report-42:email-0", "report-42:email-1"]
    # Another report run gets children of its own.
    run_inline("analytics.daily_report", payload, job_id="report-43")
    assert len(child_dispatches.started) == 4


def test_weekly_subject_names_the_iso_week(database: str, child_dispatches: ChildRecorder) -> None:
    run_inline(
        "analytics.weekly_report",
        {"period_start": "2024-03-04", "recipients": ["a@example.com"]},
        job_id="wk",
    )
    [call] = child_dispatches.calls
    assert call["job_id"] == "wk:email-0"
    subject = "jobyard weekly report: 2024-W10 (2024-03-04 to 2024-03-10)"
    assert call["payload"]["subject"] == subject


def test_recipients_default_to_the_environment(
    database: str, child_dispatches: ChildRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.REPORT_RECIPIENTS, " a@example.com, b@example.com ,, ")
    run_inline("analytics.daily_report", {"period_start": "2024-03-04"}, job_id="r")
    sent_to = [c["payload"]["to"] for c in child_dispatches.calls]
    assert sent_to == ["a@example.com", "b@example.com"]

    # An explicit empty list means "send nothing", whatever the environment says.
    result = run_inline("analytics.daily_report", {"period_start": "2024-03-04", "recipients": []})
    assert result["emails"] == [] and len(child_dispatches.calls) == 2


def test_no_recipients_dispatches_nothing(database: str) -> None:
    # No dispatcher is installed: any attempt to start a child would fail the job.
    result = run_inline("analytics.daily_report", {"period_start": "2024-03-04"})
    assert result["emails"] == []


def test_bad_recipient_in_the_environment_fails_for_good(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.REPORT_RECIPIENTS, "ops@example.com, not-an-address")
    with pytest.raises(PermanentError, match="not-an-address"):
        run_inline("analytics.daily_report", {"period_start": "2024-03-04"})


@pytest.mark.parametrize(
    ("name", "payload", "match"),
    [
        ("analytics.daily_report", {"period_start": "03/04/2024"}, "period_start"),
        ("analytics.daily_report", {"recipients": ["nope"]}, "not an e-mail address"),
        ("analytics.daily_report", {"recipients": "a@example.com"}, "recipients"),
        ("analytics.daily_report", {"period": "2024-03-04"}, "period"),
        ("analytics.weekly_report", {"period_start": "2024-03-06"}, "Monday"),
    ],
)
def test_report_rejects_bad_payloads(name: str, payload: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidPayloadError, match=match):
        run_inline(name, payload)


@pytest.mark.parametrize("values", [[7], [1, 2], [5, 1, 4, 2, 3], list(range(0, 1000, 7))])
def test_percentile_matches_linear_interpolation(values: list[int]) -> None:
    data = sorted(values)
    assert percentile(data, 0.5) == pytest.approx(statistics.median(data))
    if len(data) > 1:
        p95 = statistics.quantiles(data, n=20, method="inclusive")[18]
        assert percentile(data, 0.95) == pytest.approx(p95)
    assert percentile([], 0.5) is None

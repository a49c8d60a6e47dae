"""Analytics jobs: `analytics.daily_report` and `analytics.weekly_report`.

Each aggregates the `job_log` rows that finished in its period — counts and durations (count,
avg/p50/p95/max of `duration_ms`) grouped by name, queue, engine and final state — stores the
result as one `job_reports` row (upserted on (kind, period_start), so a retry or a re-run replaces
it instead of adding a second one) and e-mails it to the recipients, one `email.send` child job per
address, with child job ids derived from the report's job id.

Periods are in UTC and half-open: a daily report covers [period_start, period_start + 1 day), a
weekly one the ISO week [Monday, next Monday). `period_end` in the row is that exclusive end.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobyard.job_engine import env
from jobyard.job_engine.children import dispatch_child
from jobyard.job_engine.context import JobContext
from jobyard.job_engine.policy import RetryPolicy
from jobyard.job_engine.registry import job

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite

ReportKind = Literal["daily", "weekly"]

EMAIL_JOB = "email.send"
EMAIL_TEMPLATE = "report"
GROUP_KEYS = ("name", "queue", "engine", "state")
_EMAIL_RE = re.compile(r"^[^@\s,;<>]+@[^@\s,;<>]+$")


def _check_address(address: str) -> str:
    address = address.strip()
    if not _EMAIL_RE.match(address):
        raise ValueError(f"{address!r} is not an e-mail address")
    return address


class _ReportPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    period_start: date | None = Field(
        None, description="first day of the period (UTC); default: the last complete period"
    )
    recipients: list[str] | None = Field(
        None,
        description=f"addresses to e-mail the report to (default: ${env.REPORT_RECIPIENTS}, "
        "comma-separated); an empty list sends nothing",
    )

    @field_validator("recipients")
    @classmethod
    def _addresses(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_check_address(a) for a in value]


class DailyReportPayload(_ReportPayload):
    pass


class WeeklyReportPayload(_ReportPayload):
    @field_validator("period_start")
    @classmethod
    def _monday(cls, value: date | None) -> date | None:
        if value is not None and value.isoweekday() != 1:
            raise ValueError(
                f"a weekly report starts on a Monday (ISO week); {value} is a {value:%A}"
            )
        return value


# ---------------------------------------------------------------------------------------------
# Steps (module-level, JSON in and out)
# ---------------------------------------------------------------------------------------------


def report_period(kind: str, period_start: str | None) -> dict[str, str]:
    """Step: {"start", "end"} (ISO dates, end exclusive); default: yesterday / last ISO week."""
    if period_start is not None:
        start = date.fromisoformat(period_start)
    else:
        today = datetime.now(UTC).date()
        if kind == "daily":
            start = today - timedelta(days=1)
        else:
            start = today - timedelta(days=today.weekday() + 7)
    end = start + timedelta(days=1 if kind == "daily" else 7)
    return {"start": start.isoformat(), "end": end.isoformat()}


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Linear interpolation between closest ranks, as PostgreSQL's `percentile_cont`."""
    if not sorted_values:
        return None
    position = fraction * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    weight = position - lower
    return float(sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * weight)


def _stats(count: int, avg: Any, p50: Any, p95: Any, maximum: Any) -> dict[str, Any]:
    def ms(value: Any) -> float | None:
        return None if value is None else round(float(value), 3)

    return {
        "count": int(count),
        "avg_ms": ms(avg),
        "p50_ms": ms(p50),
        "p95_ms": ms(p95),
        "max_ms": None if maximum is None else int(maximum),
    }


def _aggregate_sql(
    connection: Any, start: datetime, end: datetime, keys: Sequence[str]
) -> list[dict[str, Any]]:
    """PostgreSQL: the whole aggregation in the database (percentile_cont)."""
    from sqlalchemy import func, select

    from jobyard.job_engine.db.models import JobLog

    columns = [getattr(JobLog, key) for key in keys]
    duration = JobLog.duration_ms
    query = (
        select(
            *columns,
            func.count(),
            func.avg(duration),
            func.percentile_cont(0.5).within_group(duration),
            func.percentile_cont(0.95).within_group(duration),
            func.max(duration),
        )
        .where(JobLog.finished_at >= start, JobLog.finished_at < end)
        .group_by(*columns)
    )
    rows: list[dict[str, Any]] = []
    for row in connection.execute(query):
        group = dict(zip(keys, row[: len(keys)], strict=True))
        rows.append({**group, **_stats(*row[len(keys) :])})
    return rows


def _aggregate_python(
    records: Iterable[tuple[Any, ...]], keys: Sequence[str]
) -> list[dict[str, Any]]:
    """Other databases (SQLite has no percentile functions): aggregate streamed rows here."""
    index = [GROUP_KEYS.index(key) for key in keys]
    counts: dict[tuple[Any, ...], int] = defaultdict(int)
    durations: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for record in records:
        group = tuple(record[i] for i in index)
        counts[group] += 1
        if record[-1] is not None:
            durations[group].append(record[-1])
    rows = []
    for group, count in counts.items():
        values = sorted(durations[group])
        avg = sum(values) / len(values) if values else None
        stats = _stats(
            count,
            avg,
            percentile(values, 0.5),
            percentile(values, 0.95),
            values[-1] if values else None,
        )
        rows.append({**dict(zip(keys, group, strict=True)), **stats})
    return rows


def _sort(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: tuple("" if r[k] is None else str(r[k]) for k in keys))


def aggregate_job_log(kind: str, start: str, end: str) -> dict[str, Any]:
    """Step: the report data for job_log rows with `start <= finished_at < end` (dates, UTC)."""
    from sqlalchemy import select

    from jobyard.job_engine.db import get_engine
    from jobyard.job_engine.db.models import JobLog

    since = datetime.combine(date.fromisoformat(start), time.min, tzinfo=UTC)
    until = datetime.combine(date.fromisoformat(end), time.min, tzinfo=UTC)
    engine = get_engine()
    groupings: dict[str, tuple[str, ...]] = {
        "groups": GROUP_KEYS,
        "by_name": ("name",),
        "by_state": ("state",),
        "by_engine": ("engine",),
        "total": (),
    }
    results: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            for label, keys in groupings.items():
                results[label] = _aggregate_sql(connection, since, until, keys)
        else:
            query = select(*(getattr(JobLog, k) for k in GROUP_KEYS), JobLog.duration_ms).where(
                JobLog.finished_at >= since, JobLog.finished_at < until
            )
            records = connection.execute(query).all()
            for label, keys in groupings.items():
                results[label] = _aggregate_python(records, keys)
    total = results.pop("total")
    return {
        "kind": kind,
        "period_start": start,
        "period_end": end,
        "total": total[0] if total else _stats(0, None, None, None, None),
        **{label: _sort(rows, groupings[label]) for label, rows in results.items()},
    }


def store_report(kind: str, start: str, end: str, data: dict[str, Any]) -> int:
    """Step: upsert the `job_reports` row of (kind, start); returns its id."""
    from sqlalchemy import select

    from jobyard.job_engine.db import get_engine
    from jobyard.job_engine.db.models import JobReport

    engine = get_engine()
    insert: Callable[[type[JobReport]], postgresql.Insert | sqlite.Insert]
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - jobyard supports PostgreSQL and SQLite
        raise RuntimeError(f"unsupported database {engine.dialect.name!r} for job_reports upsert")
    values = {
        "kind": kind,
        "period_start": date.fromisoformat(start),
        "period_end": date.fromisoformat(end),
        "data": data,
    }
    statement = insert(JobReport).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=[JobReport.kind, JobReport.period_start],
        set_={"period_end": statement.excluded.period_end, "data": statement.excluded.data},
    )
    with engine.begin() as connection:
        connection.execute(statement)
        return connection.execute(
            select(JobReport.id).where(
                JobReport.kind == kind, JobReport.period_start == values["period_start"]
            )
        ).scalar_one()


def report_recipients(recipients: list[str] | None) -> list[str]:
    """Step: the given recipients, or those in JOBYARD_REPORT_RECIPIENTS; de-duplicated."""
    if recipients is None:
        raw = env.get(env.REPORT_RECIPIENTS) or ""
        try:
            recipients = [_check_address(a) for a in raw.split(",") if a.strip()]
        except ValueError as exc:
            from jobyard.job_engine.errors import PermanentError

            raise PermanentError(f"{env.REPORT_RECIPIENTS}: {exc}") from None
    seen: set[str] = set()
    unique = []
    for address in recipients:
        if address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    return unique


# ---------------------------------------------------------------------------------------------
# The jobs
# ---------------------------------------------------------------------------------------------


def _subject(kind: str, start: str, end: str) -> str:
    first = date.fromisoformat(start)
    if kind == "daily":
        return f"jobyard daily report: {first.isoformat()}"
    last = date.fromisoformat(end) - timedelta(days=1)
    year, week, _ = first.isocalendar()
    return f"jobyard weekly report: {year}-W{week:02d} ({first.isoformat()} to {last.isoformat()})"


async def _report(ctx: JobContext, kind: str, payload: _ReportPayload) -> dict[str, Any]:
    start = payload.period_start.isoformat() if payload.period_start else None
    period = await ctx.run("period", report_period, kind, start)
    data = await ctx.run("aggregate", aggregate_job_log, kind, period["start"], period["end"])
    report_id = await ctx.run("store", store_report, kind, period["start"], period["end"], data)
    recipients = await ctx.run("recipients", report_recipients, payload.recipients)
    subject = _subject(kind, period["start"], period["end"])
    emails = []
    for number, address in enumerate(recipients):
        email = {
            "to": address,
            "subject": subject,
            "template": EMAIL_TEMPLATE,
            "context": {"report": data},
        }
        child_id = f"{ctx.job_id}:email-{number}"
        emails.append(await ctx.run(f"email-{number}", dispatch_child, EMAIL_JOB, email, child_id))
    return {
        "report_id": report_id,
        "kind": kind,
        "period_start": period["start"],
        "period_end": period["end"],
        "total": data["total"]["count"],
        "emails": emails,
    }


@job(
    "analytics.daily_report",
    queue="data-sync",
    payload=DailyReportPayload,
    retry=RetryPolicy(attempts=2, backoff=60),
    timeout=600,
)
async def daily_report(ctx: JobContext, payload: DailyReportPayload) -> dict[str, Any]:
    """Aggregate yesterday's job_log into job_reports and e-mail it to the recipients."""
    return await _report(ctx, "daily", payload)


@job(
    "analytics.weekly_report",
    queue="data-sync",
    payload=WeeklyReportPayload,
    retry=RetryPolicy(attempts=2, backoff=3600),
    timeout=600,
)
async def weekly_report(ctx: JobContext, payload: WeeklyReportPayload) -> dict[str, Any]:
    """Aggregate last ISO week's job_log into job_reports and e-mail it to the recipients."""
    return await _report(ctx, "weekly", payload)


__all__ = [
    "DailyReportPayload",
    "WeeklyReportPayload",
    "aggregate_job_log",
    "daily_report",
    "percentile",
    "report_period",
    "report_recipients",
    "store_report",
    "weekly_report",
]

"""The job log's queries on a big log read an index, not the whole table, even as the prepared
statements a driver reuses (a generic plan, which sees no parameter's value): the state index
leaves out succeeded jobs (migration 0009), so a query must name its states as literals, and
the primary key answers an id-prefix search (job_id sorts bytewise). Real PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg.sql import SQL, Literal
from sqlalchemy import Engine, text
from sqlalchemy.dialects import postgresql

from jobyard.dispatcher.lifecycle import DEAD_COUNTS, listing_query
from jobyard.dispatcher.rescue import unfinished_query
from jobyard.job_engine.db import get_engine, joblog
from tests.support import migrated_pg_database

SUCCEEDED = 5000


@pytest.fixture(scope="module")
def big_log() -> Iterator[Engine]:
    """A log of mostly succeeded jobs and a few of every other state, analysed."""
    with migrated_pg_database("jobyard_test_indexes") as url:
        now = time.time() - 3600
        rows = [
            {"job_id": f"ok-{uuid.uuid4().hex}", "name": "system.echo", "queue": "default",
             "engine": "dramatiq", "state": "succeeded", "enqueued_at": now + i / 100,
             "state_at": now + i / 100}
            for i in range(SUCCEEDED)
        ]  # fmt: skip
        for state in ("queued", "running", "retrying", "failed", "dead", "cancelled"):
            rows += [
                {**rows[i], "job_id": f"{state}-{i}", "state": state} for i in range(0, 5000, 500)
            ]
        joblog.upsert(rows, url)
        engine = get_engine(url)
        with engine.connect() as connection:
            connection.execute(text("ANALYZE job_log"))
            connection.commit()
        yield engine


def generic_plan(engine: Engine, query: Any) -> str:
    """EXPLAIN of `query` as a prepared statement run many times is planned: once, for every
    value of its parameters (plan_cache_mode = force_generic_plan)."""
    dialect = postgresql.dialect(paramstyle="numeric_dollar")
    compiled = query.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    values = [Literal(compiled.params[name]) for name in compiled.positiontup or []]
    arguments = SQL("({})").format(SQL(", ").join(values)) if values else SQL("")
    with engine.connect() as connection:
        cursor = connection.connection.driver_connection.cursor()
        cursor.execute("SET plan_cache_mode = force_generic_plan")
        cursor.execute(f"PREPARE listing AS {compiled}")
        try:
            cursor.execute(SQL("EXPLAIN EXECUTE listing{}").format(arguments))
            plan = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            connection.rollback()
            cursor.execute("DEALLOCATE listing")  # not undone by a rollback
    return plan


@pytest.mark.parametrize("state", ["failed", "dead", "queued", "retrying", "cancelled"])
def test_a_page_of_jobs_in_a_rare_state_is_read_off_the_state_index(big_log, state):
    plan = generic_plan(big_log, listing_query(state=state))
    assert "ix_job_log_state_enqueued_at" in plan and "Sort" not in plan, plan


def test_a_page_of_succeeded_jobs_is_read_newest_first_without_a_sort(big_log):
    plan = generic_plan(big_log, listing_query(state="succeeded"))
    assert "ix_job_log_enqueued_at_job_id" in plan and "Sort" not in plan, plan


def test_a_search_by_id_prefix_reads_the_primary_key(big_log):
    plan = generic_plan(big_log, listing_query(job_id="ok-ab"))
    assert "pk_job_log" in plan and "Seq Scan" not in plan, plan


def test_the_rescue_and_the_dead_counts_read_the_state_index(big_log):
    for query in (unfinished_query(time.time(), 100), DEAD_COUNTS):
        plan = generic_plan(big_log, query)
        assert "ix_job_log_state_enqueued_at" in plan and "Seq Scan" not in plan, plan


def test_the_listing_finds_what_it_filters(big_log, monkeypatch):
    """The literals the planner needs are still the filters asked for."""
    from jobyard.dispatcher.lifecycle import list_jobs

    monkeypatch.setenv("DATABASE_URL", str(big_log.url.render_as_string(hide_password=False)))
    assert {r.state for r in list_jobs(state="failed", limit=500)} == {"failed"}
    assert len(list_jobs(state="failed", limit=500)) == 10
    assert len(list_jobs(state="succeeded", limit=500)) == 500
    assert {r.job_id for r in list_jobs(job_id="dead-1")} == {"dead-1000", "dead-1500"}
    for odd in ("o'k", "ok\\", "ok%", "ok_", "ok'; DROP TABLE job_log; --"):
        assert list_jobs(job_id=odd) == []
    assert len(list_jobs(limit=500)) == 500

"""A held job's state events carry why it waits (display_state, waiting_reason: migration
0014), and a later state that does not say so carries nothing of it: the job log's side of
GET /jobs/{id}/events for a held job (tests/api/test_flow_api.py runs it end to end)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from jobyard.dispatcher.events import read_events
from jobyard.job_engine import db, env
from jobyard.job_engine.db import joblog
from jobyard.job_engine.db.migrate import downgrade, upgrade
from jobyard.job_engine.db.models import JobEvent

REASON = "concurrency limit concurrency:job:x (1 at once) for tenant=acme"


def test_the_migration_adds_the_hold_to_job_events(tmp_path: Path) -> None:
    def events_table(obj: Any, name: Any, type_: str, reflected: Any, compare_to: Any) -> bool:
        table = obj if type_ == "table" else getattr(obj, "table", None)
        found = name if type_ == "table" else getattr(table, "name", None)
        return bool(found == JobEvent.__tablename__)

    url = f"sqlite:///{tmp_path / 'jobyard.db'}"
    upgrade(url)
    downgrade(url, "0013_sent_events")
    upgrade(url)
    with db.get_engine(url).connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_object": events_table, "compare_type": True}
        )
        assert compare_metadata(context, db.Base.metadata) == []


def test_a_held_state_event_says_why_and_the_next_state_does_not(
    tmp_path: Path, monkeypatch: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'jobyard.db'}"
    upgrade(url)
    monkeypatch.setenv(env.DATABASE_URL, url)
    held = {
        "name": "x", "queue": "q", "engine": "dramatiq", "state": "queued", "run_at": 1_000.5,
        "display_state": "waiting for slot", "waiting_reason": REASON,
    }  # fmt: skip
    # Both changes in one batch (one merge), and each in a batch of its own.
    joblog.upsert_rounds(joblog.merge_rounds([
        (1_000.0, "one", held),
        (1_001.0, "one", {"name": "x", "engine": "dramatiq", "state": "running", "attempts": 1}),
    ]), url)  # fmt: skip
    joblog.upsert_rounds(joblog.merge_rounds([(1_000.0, "two", held)]), url)
    joblog.upsert_rounds(joblog.merge_rounds([(1_001.0, "two", {"state": "running"})]), url)
    for job_id in ("one", "two"):
        queued, running = (e.as_dict() for e in read_events(job_id))
        assert (queued["state"], queued["display_state"]) == ("queued", "waiting for slot")
        assert queued["waiting_reason"] == REASON and queued["run_at"] is not None
        assert running["state"] == "running"
        assert "display_state" not in running and "waiting_reason" not in running

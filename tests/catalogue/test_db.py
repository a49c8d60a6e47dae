"""The database layer and the migrations, against real PostgreSQL and real SQLite files."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError

from jobyard.job_engine import db, env
from jobyard.job_engine.db import migrate
from jobyard.job_engine.db.models import ConversationMessage, JobLog, JobReport, Token

TABLES = {
    "job_events", "job_stats", "tokens", "conversation_messages", "job_log", "job_reports",
    "dispatch_outbox",
}  # fmt: skip


# --- database_url / get_engine / session_scope --------------------------------------------------


def test_default_url_is_an_sqlite_file_under_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(env.DATABASE_URL, raising=False)
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / ".jobyard").exists()

    url = db.database_url()

    assert url == f"sqlite:///{tmp_path.resolve()}/.jobyard/jobyard.db"
    assert (tmp_path / ".jobyard").is_dir()


def test_empty_database_url_falls_back_to_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.DATABASE_URL, "")
    monkeypatch.chdir(tmp_path)
    assert db.database_url().startswith("sqlite:///")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgresql://u@h/d?sslmode=require", "postgresql+psycopg://u@h/d?sslmode=require"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_database_url_normalises_postgres_schemes(
    given: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.DATABASE_URL, given)
    assert db.database_url() == expected


def test_engine_is_cached_per_url_and_speaks_psycopg3(pg_url: str) -> None:
    plain = pg_url  # postgresql://... as configured by users
    engine = db.get_engine(plain)
    assert engine is db.get_engine(plain.replace("postgresql://", "postgres://", 1))
    assert engine.dialect.driver == "psycopg"
    with engine.connect() as connection:
        assert connection.execute(text("select 1")).scalar() == 1


def test_get_engine_without_url_uses_database_url(pg_database: str) -> None:
    assert db.get_engine() is db.get_engine(pg_database)


def test_session_scope_commits_and_rolls_back(database: str) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    with db.session_scope() as session:
        session.add(Token(user_id="u1", token="kept", expires_at=expires))

    with pytest.raises(RuntimeError, match="boom"), db.session_scope() as session:
        session.add(Token(user_id="u1", token="rolled-back", expires_at=expires))
        session.flush()  # the row reached the database inside the transaction
        raise RuntimeError("boom")

    with db.session_scope(database) as session:
        assert session.scalars(select(Token.token)).all() == ["kept"]


def test_sqlite_file_is_created_in_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "jobs.db"
    migrate.upgrade(f"sqlite:///{path}")
    assert path.is_file()
    db.dispose_engines(f"sqlite:///{path}")


# --- migrations ----------------------------------------------------------------------------------


def _check_schema(url: str) -> None:
    engine = db.get_engine(url)
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) >= TABLES
    columns = {c["name"] for c in inspector.get_columns("job_log")}
    assert columns >= {  # later migrations may add columns
        "job_id", "name", "queue", "engine", "state", "attempts", "payload", "result",
        "error_class", "error_message", "error_traceback", "fallback_reason", "progress",
        "enqueued_at", "started_at", "finished_at", "duration_ms",
    }  # fmt: skip
    assert inspector.get_pk_constraint("job_log")["constrained_columns"] == ["job_id"]
    indexed = {tuple(i["column_names"]) for i in inspector.get_indexes("job_log")}
    assert {("state", "enqueued_at", "job_id"), ("finished_at",)} <= indexed
    uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("job_reports")}
    assert ("kind", "period_start") in uniques
    assert ("job_id",) in {
        tuple(u["column_names"]) for u in inspector.get_unique_constraints("conversation_messages")
    }
    assert ("conversation_id",) in {
        tuple(i["column_names"]) for i in inspector.get_indexes("conversation_messages")
    }
    token_uniques = inspector.get_unique_constraints("tokens")
    assert ("token",) in {tuple(u["column_names"]) for u in token_uniques}
    assert migrate.current_revision(url) == migrate.head_revision()


def _schema_drift(url: str) -> list:
    """Differences between the models and the migrated schema, for jobyard's own four tables."""

    def ours(obj, name, type_, reflected, compare_to) -> bool:  # type: ignore[no-untyped-def]
        table = obj if type_ == "table" else getattr(obj, "table", None)
        return (name if type_ == "table" else getattr(table, "name", None)) in TABLES

    with db.get_engine(url).connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_object": ours, "compare_type": True}
        )
        return compare_metadata(context, db.Base.metadata)


def test_upgrade_fresh_postgresql_database(fresh_pg_url: str) -> None:
    url = fresh_pg_url
    assert migrate.current_revision(url) is None
    migrate.upgrade(url)
    _check_schema(url)
    assert _schema_drift(url) == []
    tz = inspect(db.get_engine(url)).get_columns("tokens")
    assert {c["name"]: c["type"].timezone for c in tz if c["name"].endswith("_at")} == {
        "expires_at": True,
        "created_at": True,
    }
    migrate.upgrade(url)  # idempotent
    migrate.downgrade(url, "base")
    assert not TABLES & set(inspect(db.get_engine(url)).get_table_names())
    migrate.upgrade(url, "0001_initial")
    assert migrate.current_revision(url) == "0001_initial"


def test_upgrade_fresh_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert migrate.current_revision(url) is None
    migrate.upgrade(url)
    _check_schema(url)
    assert _schema_drift(url) == []
    db.dispose_engines(url)


def test_upgrade_defaults_to_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(env.DATABASE_URL, raising=False)
    migrate.upgrade()
    assert (tmp_path / ".jobyard" / "jobyard.db").is_file()
    _check_schema(db.database_url())
    db.dispose_engines(db.database_url())


def test_migrations_are_shipped_inside_the_package() -> None:
    package_dir = Path(db.__file__).parent
    assert package_dir / "migrations" == migrate.MIGRATIONS_DIR
    assert (package_dir / "migrations" / "env.py").is_file()
    assert (package_dir / "migrations" / "versions" / "0001_initial.py").is_file()


# --- models --------------------------------------------------------------------------------------


def test_timestamps_come_back_timezone_aware_in_utc(database: str) -> None:
    paris = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).astimezone(ZoneInfo("Europe/Paris"))
    with db.session_scope() as session:
        session.add(Token(user_id="u", token="t", expires_at=paris))
    with db.session_scope() as session:
        token = session.scalars(select(Token)).one()
        assert token.expires_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
        assert token.expires_at.utcoffset() == timedelta(0)
        assert token.created_at.tzinfo is not None
        assert abs(token.created_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_naive_datetimes_are_refused(database: str) -> None:
    with pytest.raises(StatementError, match="naive datetime"), db.session_scope() as session:
        session.add(Token(user_id="u", token="t", expires_at=datetime(2024, 1, 1)))
        session.flush()


def test_token_value_is_unique(database: str) -> None:
    expires = datetime.now(UTC)
    with db.session_scope() as session:
        session.add(Token(user_id="u", token="same", expires_at=expires))
    with pytest.raises(IntegrityError), db.session_scope() as session:
        session.add(Token(user_id="v", token="same", expires_at=expires))


def test_conversation_message_job_id_makes_a_store_idempotent(database: str) -> None:
    def store() -> None:
        with db.session_scope() as session:
            session.add(
                ConversationMessage(
                    conversation_id="c1",
                    user_id="u",
                    role="assistant",
                    content="hi",
                    model="m",
                    job_id="job-1",
                )
            )

    store()
    with pytest.raises(IntegrityError):
        store()
    with db.session_scope() as session:  # messages without a job id may repeat
        for _ in range(2):
            session.add(ConversationMessage(conversation_id="c1", role="user", content="q"))
    with db.session_scope() as session:
        assert len(session.scalars(select(ConversationMessage)).all()) == 3


def test_conversation_message_role_is_checked(database: str) -> None:
    with pytest.raises(IntegrityError), db.session_scope() as session:
        session.add(ConversationMessage(conversation_id="c", role="system", content="x"))


def test_job_log_round_trip_and_state_check(database: str) -> None:
    now = datetime.now(UTC)
    with db.session_scope() as session:
        session.add(
            JobLog(
                job_id="j1",
                name="system.echo",
                queue="default",
                engine="temporal",
                state="succeeded",
                attempts=2,
                payload={"a": [1, 2]},
                result={"ok": True},
                progress={"done": 3},
                enqueued_at=now,
                started_at=now,
                finished_at=now,
                duration_ms=12,
                fallback_reason="no live workers",
            )
        )
    with db.session_scope() as session:
        row = session.get(JobLog, "j1")
        assert row is not None
        assert (row.payload, row.result, row.progress) == ({"a": [1, 2]}, {"ok": True}, {"done": 3})
        assert row.finished_at == now
    with pytest.raises(IntegrityError), db.session_scope() as session:
        session.add(JobLog(job_id="j2", name="x", state="exploded"))
    with pytest.raises(IntegrityError), db.session_scope() as session:
        session.add(JobLog(job_id="j3", name="x", state="queued", engine="celery"))


def test_job_report_is_unique_per_kind_and_period_start(database: str) -> None:
    day = date(2024, 3, 4)
    with db.session_scope() as session:
        session.add(JobReport(kind="daily", period_start=day, period_end=day, data={}))
        session.add(JobReport(kind="weekly", period_start=day, period_end=day, data={}))
    with pytest.raises(IntegrityError), db.session_scope() as session:
        session.add(JobReport(kind="daily", period_start=day, period_end=day, data={"x": 1}))

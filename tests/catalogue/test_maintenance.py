"""maintenance.token_cleanup and maintenance.file_cleanup, run on the in-process engine against a
real database and real files."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import insert, select, text

from jobyard.job_engine import db, env
from jobyard.job_engine.db.models import Token
from jobyard.job_engine.errors import InvalidPayloadError, PermanentError
from jobyard.job_engine.inline import run_inline
from jobyard.job_engine.jobs import maintenance
from jobyard.job_engine.registry import get_spec

if TYPE_CHECKING:
    from tests.engines import Engines

# --- token_cleanup -------------------------------------------------------------------------------


def _add_tokens(prefix: str, expires_at: datetime, count: int) -> None:
    rows = [
        {"user_id": f"user-{i % 7}", "token": f"{prefix}-{i}", "expires_at": expires_at}
        for i in range(count)
    ]
    with db.session_scope() as session:
        session.execute(insert(Token), rows)


def _tokens() -> set[str]:
    with db.session_scope() as session:
        return set(session.scalars(select(Token.token)))


def test_token_cleanup_declaration() -> None:
    spec = get_spec("maintenance.token_cleanup")
    assert spec.queue == "scheduled"
    assert (spec.retry.attempts, spec.retry.backoff) == (2, 3600)
    assert spec.timeout == 600


def test_deletes_expired_tokens_in_batches_and_keeps_the_rest(database: str) -> None:
    now = datetime.now(UTC)
    _add_tokens("expired", now - timedelta(days=3), 23)
    _add_tokens("just-expired", now - timedelta(seconds=5), 2)
    _add_tokens("valid", now + timedelta(hours=1), 7)

    result = run_inline("maintenance.token_cleanup", {"batch_size": 5})

    assert result == {"deleted": 25, "batches": 5}  # 5+5+5+5+5, then an empty batch
    assert _tokens() == {f"valid-{i}" for i in range(7)}


def test_short_last_batch_and_second_run_finds_nothing(database: str) -> None:
    _add_tokens("expired", datetime.now(UTC) - timedelta(minutes=1), 12)
    assert run_inline("maintenance.token_cleanup", {"batch_size": 5}) == {
        "deleted": 12,
        "batches": 3,
    }
    assert run_inline("maintenance.token_cleanup", {"batch_size": 5}) == {
        "deleted": 0,
        "batches": 0,
    }


def test_before_sets_the_cutoff(database: str) -> None:
    cutoff = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    _add_tokens("older", cutoff - timedelta(microseconds=1), 3)
    _add_tokens("at-cutoff", cutoff, 2)  # expires_at < before: the boundary itself is kept
    _add_tokens("newer", cutoff + timedelta(days=1), 4)  # expired by now, but after `before`

    result = run_inline(
        "maintenance.token_cleanup", {"before": "2024-06-01T14:00:00+02:00", "batch_size": 2}
    )

    assert result == {"deleted": 3, "batches": 2}
    assert _tokens() == {"at-cutoff-0", "at-cutoff-1"} | {f"newer-{i}" for i in range(4)}


def test_a_future_before_cannot_delete_valid_tokens(database: str) -> None:
    _add_tokens("expired", datetime.now(UTC) - timedelta(minutes=1), 2)
    _add_tokens("valid", datetime.now(UTC) + timedelta(hours=1), 3)
    result = run_inline("maintenance.token_cleanup", {"before": "9999-12-31T00:00:00Z"})
    assert result == {"deleted": 2, "batches": 1}
    assert _tokens() == {f"valid-{i}" for i in range(3)}


def test_more_batches_than_fit_in_one_step(database: str) -> None:
    count = maintenance.BATCHES_PER_STEP * 2 + 3
    _add_tokens("expired", datetime.now(UTC) - timedelta(hours=1), count)
    _add_tokens("valid", datetime.now(UTC) + timedelta(hours=1), 1)

    result = run_inline("maintenance.token_cleanup", {"batch_size": 1})

    assert result == {"deleted": count, "batches": count}
    assert _tokens() == {"valid-0"}


def test_default_batch_size_is_5000(pg_database: str) -> None:
    with db.get_engine().begin() as connection:
        connection.execute(
            text(
                "INSERT INTO tokens (user_id, token, expires_at) "
                "SELECT 'u', 'tok-' || g, now() - interval '1 day' "
                "FROM generate_series(1, 12000) AS g"
            )
        )
    _add_tokens("valid", datetime.now(UTC) + timedelta(days=1), 3)

    assert run_inline("maintenance.token_cleanup", {}) == {"deleted": 12000, "batches": 3}
    assert len(_tokens()) == 3


def test_skips_rows_locked_by_another_session(pg_database: str) -> None:
    """Batches never wait on rows another transaction holds (a concurrent cleanup, a login)."""
    _add_tokens("expired", datetime.now(UTC) - timedelta(hours=1), 10)
    cutoff = datetime.now(UTC).isoformat()
    with db.get_engine().begin() as connection:
        # Lock 3 rows elsewhere: SKIP LOCKED passes over them instead of waiting.
        connection.execute(
            text("SELECT id FROM tokens WHERE token IN ('expired-0','expired-1','expired-2') "
                 "FOR UPDATE")
        )  # fmt: skip
        outcome: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: outcome.update(
                maintenance.delete_expired_tokens(cutoff, batch_size=2, max_batches=100)
            )
        )
        worker.start()
        worker.join(timeout=20)
        assert not worker.is_alive(), "token cleanup waited for rows locked by another session"
    assert outcome == {"deleted": 7, "batches": 4, "done": True}
    assert _tokens() == {"expired-0", "expired-1", "expired-2"}
    assert run_inline("maintenance.token_cleanup", {}) == {"deleted": 3, "batches": 1}


def test_batches_use_indexes_not_a_scan_per_batch(pg_database: str) -> None:
    """Each batch must cost O(batch), not O(table): PostgreSQL plans `id IN (SELECT ... LIMIT)` as
    a hash semi-join over a sequential scan of all tokens, which made big cleanups quadratic."""
    engine = db.get_engine()
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO tokens (user_id, token, expires_at) "
                "SELECT 'u', 'tok-' || g, now() - interval '1 day' "
                "FROM generate_series(1, 50000) AS g"
            )
        )
        connection.execute(text("ANALYZE tokens"))
    statement = maintenance.token_batch_delete("postgresql", datetime.now(UTC), 5000)
    compiled = statement.compile(dialect=engine.dialect)
    with engine.connect() as connection:
        plan = "\n".join(
            row[0]
            for row in connection.exec_driver_sql(f"EXPLAIN {compiled}", dict(compiled.params))
        )
    assert "Seq Scan" not in plan, plan
    assert "pk_tokens" in plan and "ix_tokens_expires_at" in plan, plan


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "many"}, "batch_size"),
        ({"before": "2024-01-01T00:00:00"}, "before"),  # naive: which time zone?
        ({"before": "yesterday"}, "before"),
        ({"batchsize": 10}, "batchsize"),
    ],
)
def test_token_cleanup_rejects_bad_payloads(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPayloadError, match=field):
        run_inline("maintenance.token_cleanup", payload)


# --- file_cleanup --------------------------------------------------------------------------------

DAY = 86_400


def _write(path: Path, size: int, age_seconds: float = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    if age_seconds:
        stamp = time.time() - age_seconds
        os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/ with old and new files, nested old-only dirs, symlinks out to `outside/`."""
    root = tmp_path / "tmp-root"
    outside = tmp_path / "outside"
    paths = {
        "root": root,
        "outside": outside,
        "old": _write(root / "old.bin", 100, 2 * DAY),
        "new": _write(root / "new.bin", 10),
        "deep_old": _write(root / "a" / "b" / "c" / "old.bin", 50, 3 * DAY),
        "mixed_old": _write(root / "mixed" / "old.bin", 7, 2 * DAY),
        "mixed_new": _write(root / "mixed" / "new.bin", 3),
        "target": _write(outside / "secret.txt", 1000, 10 * DAY),
        "outside_dir_file": _write(outside / "dir" / "old.bin", 1000, 10 * DAY),
    }
    (root / "pre-existing-empty").mkdir()
    link = root / "link-to-secret"
    link.symlink_to(paths["target"])
    os.utime(link, (time.time() - 10 * DAY,) * 2, follow_symlinks=False)
    (root / "a" / "link-to-dir").symlink_to(outside / "dir", target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    paths.update(link=link)
    return paths


def test_file_cleanup_declaration() -> None:
    spec = get_spec("maintenance.file_cleanup")
    assert spec.queue == "scheduled"
    assert (spec.retry.attempts, spec.retry.backoff) == (3, 30)
    assert spec.timeout == 600


def test_deletes_old_files_and_never_follows_symlinks(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tree["root"]
    monkeypatch.setenv(env.TEMP_DIR, str(root))

    result = run_inline("maintenance.file_cleanup", {"directory": str(root)})

    assert result == {
        "directory": str(root.resolve()),
        "ttl_seconds": DAY,
        "files_deleted": 3,
        "bytes_freed": 100 + 50 + 7,
        "dirs_removed": 2,  # a/b/c, a/b; not a (it still holds a symlink), not the root
        "files_kept": 2,
        "symlinks_skipped": 3,
        "errors": 0,
    }
    for gone in ("old", "deep_old", "mixed_old"):
        assert not tree[gone].exists()
    assert tree["new"].exists() and tree["mixed_new"].exists()
    # Symlinks: untouched, and so are their targets outside the directory.
    assert tree["link"].is_symlink() and tree["target"].read_bytes() == b"x" * 1000
    assert (root / "a" / "link-to-dir").is_symlink()
    assert tree["outside_dir_file"].exists()
    assert (root / "dangling").is_symlink()
    # Emptied directories go; a directory that was already empty is not ours to remove.
    assert not (root / "a" / "b").exists()
    assert (root / "a").is_dir()
    assert (root / "pre-existing-empty").is_dir()
    assert root.is_dir()


def test_removes_the_whole_emptied_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "r"
    monkeypatch.setenv(env.TEMP_DIR, str(tmp_path))
    _write(root / "x" / "y" / "z" / "f", 5, 2 * DAY)
    result = run_inline("maintenance.file_cleanup", {"directory": str(root), "ttl_seconds": 60})
    assert (result["files_deleted"], result["dirs_removed"]) == (1, 3)
    assert list(root.iterdir()) == []


def test_ttl_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "r"
    monkeypatch.setenv(env.TEMP_DIR, str(tmp_path))
    young = _write(root / "young", 1, 30)
    old = _write(root / "old", 1, 120)
    result = run_inline("maintenance.file_cleanup", {"directory": str(root), "ttl_seconds": 60})
    assert (result["files_deleted"], result["files_kept"]) == (1, 1)
    assert young.exists() and not old.exists()


def test_directory_defaults_to_jobyard_temp_dir(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.TEMP_DIR, str(tree["root"]))
    result = run_inline("maintenance.file_cleanup", {})
    assert result["files_deleted"] == 3
    assert tree["target"].exists()


def test_relative_directory_is_taken_under_the_root(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.TEMP_DIR, str(tree["root"]))
    result = run_inline("maintenance.file_cleanup", {"directory": "mixed"})
    assert result["directory"] == str((tree["root"] / "mixed").resolve())
    assert result["files_deleted"] == 1
    assert tree["old"].exists()  # outside the swept subdirectory


def test_refuses_a_directory_that_is_a_symlink(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.TEMP_DIR, str(tree["root"].parent))
    link = tree["root"].parent / "root-link"
    link.symlink_to(tree["outside"], target_is_directory=True)
    with pytest.raises(PermanentError, match="symlink"):
        run_inline("maintenance.file_cleanup", {"directory": str(link)})
    assert tree["target"].exists() and tree["outside_dir_file"].exists()


@pytest.mark.parametrize("escape", ["absolute", "dotdot"])
def test_refuses_a_directory_outside_the_root(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch, escape: str
) -> None:
    monkeypatch.setenv(env.TEMP_DIR, str(tree["root"]))
    directory = str(tree["outside"]) if escape == "absolute" else "../outside"
    with pytest.raises(PermanentError, match="outside"):
        run_inline("maintenance.file_cleanup", {"directory": directory})
    assert tree["target"].exists() and tree["outside_dir_file"].exists()


def test_refuses_when_nothing_is_configured() -> None:
    with pytest.raises(PermanentError, match=env.TEMP_DIR):
        run_inline("maintenance.file_cleanup", {})


def test_an_explicit_directory_without_a_configured_root_is_refused(
    tree: dict[str, Path],
) -> None:
    """The issue's finding: a payload alone named a folder and it was emptied."""
    with pytest.raises(PermanentError, match=env.TEMP_DIR):
        run_inline(
            "maintenance.file_cleanup", {"directory": str(tree["outside"]), "ttl_seconds": 0}
        )
    assert tree["target"].exists() and tree["outside_dir_file"].exists()


def test_refuses_a_missing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.TEMP_DIR, str(tmp_path))
    with pytest.raises(PermanentError, match="not a directory"):
        run_inline("maintenance.file_cleanup", {"directory": str(tmp_path / "nope")})


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"ttl_seconds": -1}, "ttl_seconds"),
        ({"directory": "  "}, "directory"),
        ({"directory": "/tmp", "recursive": False}, "recursive"),
    ],
)
def test_file_cleanup_rejects_bad_payloads(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPayloadError, match=field):
        run_inline("maintenance.file_cleanup", payload)


# --- on the real engines -------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_token_cleanup_on_the_real_engines(
    engine: str, pg_database: str, engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same job code on a `jobyard worker` / `jobyard temporal-worker` subprocess."""
    monkeypatch.setenv(env.DATABASE_URL, pg_database)  # read by the worker processes
    now = datetime.now(UTC)
    _add_tokens("expired", now - timedelta(hours=2), 11)
    _add_tokens("valid", now + timedelta(hours=2), 4)

    status = engines.run(engine, "maintenance.token_cleanup", {"batch_size": 3}, timeout=90)

    assert status.state == "succeeded", status
    assert status.engine == engine
    assert status.result == {"deleted": 11, "batches": 4}
    assert _tokens() == {f"valid-{i}" for i in range(4)}

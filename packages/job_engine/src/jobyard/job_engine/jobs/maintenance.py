"""Maintenance jobs run on a schedule: `maintenance.token_cleanup` and `maintenance.file_cleanup`.

Both are safe to retry and to run concurrently with themselves: deleting what is already gone is
a no-op.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from jobyard.job_engine import env
from jobyard.job_engine.context import JobContext
from jobyard.job_engine.errors import PermanentError
from jobyard.job_engine.policy import RetryPolicy
from jobyard.job_engine.registry import job

# --------------------------------------------------------------------------------------------
# maintenance.token_cleanup
# --------------------------------------------------------------------------------------------

DEFAULT_TOKEN_BATCH_SIZE = 5_000
# Batches per step. A step is one activity on Temporal: grouping batches keeps the workflow
# history small for huge tables, while each batch still commits on its own.
BATCHES_PER_STEP = 50


class TokenCleanupPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(
        DEFAULT_TOKEN_BATCH_SIZE, ge=1, le=1_000_000, description="rows deleted per transaction"
    )
    before: AwareDatetime | None = Field(
        None,
        description="delete tokens that expired before this instant (default: now); a future "
        "instant counts as now, so no call can delete a token that is still valid",
    )


def token_cutoff(before: str | None) -> str:
    """Step: the cutoff instant as ISO text in UTC: `before`, but never later than now."""
    now = datetime.now(UTC)
    instant = min(datetime.fromisoformat(before), now) if before else now
    return instant.astimezone(UTC).isoformat()


def token_batch_delete(dialect: str, cutoff: datetime, batch_size: int) -> Any:
    """The DELETE of one batch: at most `batch_size` tokens with `expires_at < cutoff`, oldest
    first, chosen by a `SELECT id ... LIMIT n` subselect.

    On PostgreSQL the ids are taken as
    `id = ANY(ARRAY(SELECT id ... ORDER BY expires_at LIMIT n FOR UPDATE SKIP LOCKED))`: the
    same rows as `id IN (SELECT ...)`, but planned as one index range scan plus primary-key
    lookups (PostgreSQL plans the IN form as a hash semi-join over a sequential scan of the whole
    table, once per batch, which made a 1M-row cleanup quadratic), and rows another transaction
    holds are skipped instead of waited for. Elsewhere (SQLite) it is `id IN (SELECT ...)`.
    """
    # Imported here, not at module level: job modules are also loaded inside Temporal's workflow
    # sandbox, which must not import database drivers.
    from sqlalchemy import any_, delete, func, select

    from jobyard.job_engine.db.models import Token

    ids = (
        select(Token.id)
        .where(Token.expires_at < cutoff)
        .order_by(Token.expires_at)
        .limit(batch_size)
    )
    if dialect == "postgresql":
        ids = ids.with_for_update(skip_locked=True)
        return delete(Token).where(Token.id == any_(func.array(ids.scalar_subquery())))
    return delete(Token).where(Token.id.in_(ids.scalar_subquery()))


def delete_expired_tokens(cutoff: str, batch_size: int, max_batches: int) -> dict[str, Any]:
    """Step: delete up to `max_batches` batches of tokens with `expires_at < cutoff`, each batch
    in its own short transaction so that no lock is held across batches.

    Returns {"deleted", "batches", "done"}; `done` once a batch came up short.
    """
    from jobyard.job_engine.db import get_engine

    engine = get_engine()
    statement = token_batch_delete(engine.dialect.name, datetime.fromisoformat(cutoff), batch_size)
    deleted = batches = 0
    for _ in range(max_batches):
        with engine.begin() as connection:
            count = connection.execute(statement).rowcount
        if count > 0:
            deleted += count
            batches += 1
        if count < batch_size:
            return {"deleted": deleted, "batches": batches, "done": True}
    return {"deleted": deleted, "batches": batches, "done": False}


@job(
    "maintenance.token_cleanup",
    queue="scheduled",
    payload=TokenCleanupPayload,
    retry=RetryPolicy(attempts=2, backoff=3600),
    timeout=600,
    http=False,
)
async def token_cleanup(ctx: JobContext, payload: TokenCleanupPayload) -> dict[str, int]:
    """Delete expired tokens in small batches; returns {"deleted", "batches"}."""
    before = payload.before.isoformat() if payload.before else None
    cutoff = await ctx.run("cutoff", token_cutoff, before)
    deleted = batches = 0
    round_ = 0
    while True:
        round_ += 1
        result = await ctx.run(
            f"delete-{round_}", delete_expired_tokens, cutoff, payload.batch_size, BATCHES_PER_STEP
        )
        deleted += result["deleted"]
        batches += result["batches"]
        if result["done"]:
            break
        await ctx.progress({"deleted": deleted, "batches": batches})
    return {"deleted": deleted, "batches": batches}


# --------------------------------------------------------------------------------------------
# maintenance.file_cleanup
# --------------------------------------------------------------------------------------------

DEFAULT_FILE_TTL_SECONDS = 86_400


class FileCleanupPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: str | None = Field(
        None,
        description=f"directory to sweep (default: ${env.TEMP_DIR}); it must lie inside "
        f"{env.TEMP_DIR}, without which the job refuses to run",
    )
    ttl_seconds: int = Field(
        DEFAULT_FILE_TTL_SECONDS, ge=0, description="delete regular files older than this"
    )

    @field_validator("directory")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\x00" in value):
            raise ValueError("must be a non-empty path")
        return value


def _is_within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_cleanup_directory(directory: str | None) -> str:
    """The directory to sweep, checked: a real directory (not a symlink), inside the root.

    No root, no sweep: without JOBYARD_TEMP_DIR nothing says which files are disposable, and
    a directory named in a payload alone must never decide what gets deleted.
    """
    root = env.get(env.TEMP_DIR)
    if not root or not os.path.isabs(root):
        raise PermanentError(
            f"maintenance.file_cleanup: refusing to run: set {env.TEMP_DIR} to the absolute "
            "path of the directory whose old files may be deleted"
        )
    if directory is None:
        directory = root
    elif not os.path.isabs(directory):
        directory = os.path.join(root, directory)
    if not os.path.isabs(directory):
        raise PermanentError(f"maintenance.file_cleanup: directory {directory!r} is not absolute")
    path = os.path.abspath(directory)
    if os.path.islink(path):
        raise PermanentError(f"maintenance.file_cleanup: refusing {path!r}: it is a symlink")
    if not os.path.isdir(path):
        raise PermanentError(f"maintenance.file_cleanup: {path!r} is not a directory")
    real = os.path.realpath(path)
    real_root = os.path.realpath(root)
    if not _is_within(real, real_root):
        raise PermanentError(
            f"maintenance.file_cleanup: refusing {path!r}: it resolves to {real!r}, "
            f"outside {env.TEMP_DIR}={root!r}"
        )
    return real


def sweep_old_files(directory: str, ttl_seconds: int) -> dict[str, Any]:
    """Step: delete regular files under `directory` not modified for `ttl_seconds`.

    Never follows a symlink: `os.fwalk` (the dir-fd form of `os.walk(followlinks=False)`) opens
    each directory relative to its parent without following links, and every lstat/unlink/rmdir
    is done relative to that descriptor, so swapping a subdirectory for a symlink mid-sweep cannot
    redirect a deletion outside the tree. Symlinks are skipped entirely (neither the link nor its
    target is touched); sockets, FIFOs and devices are left alone. Subdirectories that this sweep
    emptied are removed; the swept directory itself is kept.
    """
    top = resolve_cleanup_directory(directory)
    cutoff = time.time() - ttl_seconds
    counts = {
        "files_deleted": 0,
        "bytes_freed": 0,
        "dirs_removed": 0,
        "files_kept": 0,
        "symlinks_skipped": 0,
        "errors": 0,
    }
    emptied: set[str] = set()  # directories (paths) this sweep left empty

    def on_error(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            counts["errors"] += 1

    for dirpath, dirnames, filenames, dir_fd in os.fwalk(
        top, topdown=False, onerror=on_error, follow_symlinks=False
    ):
        changed = False
        for name in filenames:
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            except OSError:
                counts["errors"] += 1
                continue
            if stat.S_ISLNK(st.st_mode):
                counts["symlinks_skipped"] += 1
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_mtime >= cutoff:
                counts["files_kept"] += 1
                continue
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            except OSError:
                counts["errors"] += 1
                continue
            counts["files_deleted"] += 1
            counts["bytes_freed"] += st.st_size
            changed = True
        for name in dirnames:
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                counts["symlinks_skipped"] += 1
                continue
            if os.path.join(dirpath, name) not in emptied:
                continue
            try:
                os.rmdir(name, dir_fd=dir_fd)
            except OSError as exc:  # something new arrived meanwhile: keep it
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    counts["errors"] += 1
                continue
            counts["dirs_removed"] += 1
            changed = True
        if changed and dirpath != top and not os.listdir(dir_fd):
            emptied.add(dirpath)
    return {"directory": top, "ttl_seconds": ttl_seconds, **counts}


@job(
    "maintenance.file_cleanup",
    queue="scheduled",
    payload=FileCleanupPayload,
    retry=RetryPolicy(attempts=3, backoff=30),
    timeout=600,
    http=False,
)
async def file_cleanup(ctx: JobContext, payload: FileCleanupPayload) -> dict[str, Any]:
    """Delete files older than a TTL under a temp directory, never following symlinks."""
    swept: dict[str, Any] = await ctx.run(
        "sweep", sweep_old_files, payload.directory, payload.ttl_seconds
    )
    return swept


__all__ = [
    "FileCleanupPayload",
    "TokenCleanupPayload",
    "delete_expired_tokens",
    "file_cleanup",
    "resolve_cleanup_directory",
    "sweep_old_files",
    "token_batch_delete",
    "token_cleanup",
    "token_cutoff",
]

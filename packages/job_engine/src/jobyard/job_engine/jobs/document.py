"""`document.convert`: DOCX/ODT/PPTX/XLSX (and ODS/ODP) to PDF with LibreOffice headless.

Paths are relative to the storage root (`JOBYARD_STORAGE_ROOT`). They are checked twice:

* at dispatch (pydantic): no absolute path, no `..`, a known extension;
* in the step, after resolving symlinks: the real input and output must lie inside the real root.

Each conversion runs `soffice --headless --convert-to pdf` with a profile directory of its own
(`-env:UserInstallation=file:///tmp/...`), so parallel conversions do not fight over one profile,
writes into a temporary directory and moves the PDF into place (readers never see half a file).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobyard.job_engine import env
from jobyard.job_engine.context import JobContext
from jobyard.job_engine.errors import PermanentError
from jobyard.job_engine.policy import RetryPolicy
from jobyard.job_engine.registry import job

TIMEOUT_SECONDS = 120.0
CONVERT_TIMEOUT = 100.0  # seconds soffice may take, inside the job's 120 s
INPUT_SUFFIXES = frozenset({".docx", ".odt", ".pptx", ".xlsx", ".ods", ".odp"})
INSTALL_HINT = (
    "LibreOffice is not installed: soffice was not found on PATH "
    f"(or set {env.SOFFICE_PATH}). On Debian/Ubuntu: apt-get install --no-install-recommends "
    "libreoffice-writer-nogui libreoffice-calc-nogui libreoffice-impress-nogui "
    "(or libreoffice-core plus -writer/-calc/-impress)"
)


class DocumentRetryableError(Exception):
    """soffice crashed or timed out: the conversion is retried."""


def check_relative(value: str) -> str:
    """A relative path inside the storage root, as written (POSIX separators)."""
    if not value or "\0" in value:
        raise ValueError("empty path or NUL byte")
    if "\\" in value:
        raise ValueError(f"{value!r}: use / as the path separator")
    path = PurePosixPath(value)
    if path.is_absolute() or value.startswith("~"):
        raise ValueError(f"{value!r} is absolute; give a path relative to the storage root")
    if ".." in path.parts:
        raise ValueError(f"{value!r} contains '..'; paths must stay inside the storage root")
    if not path.name or path.name in (".",):
        raise ValueError(f"{value!r} does not name a file")
    return str(path)


class ConvertPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_path: str = Field(description="the document, relative to JOBYARD_STORAGE_ROOT")
    output_path: str | None = Field(
        default=None, description="the PDF, relative to the root (default: input with .pdf)"
    )

    @field_validator("input_path")
    @classmethod
    def _input(cls, value: str) -> str:
        value = check_relative(value)
        if PurePosixPath(value).suffix.lower() not in INPUT_SUFFIXES:
            known = ", ".join(sorted(INPUT_SUFFIXES))
            raise ValueError(f"{value!r}: cannot convert this type to PDF (known: {known})")
        return value

    @field_validator("output_path")
    @classmethod
    def _output(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = check_relative(value)
        if PurePosixPath(value).suffix.lower() != ".pdf":
            raise ValueError(f"{value!r}: the output must be a .pdf file")
        return value

    @model_validator(mode="after")
    def _default_output(self) -> ConvertPayload:
        if self.output_path is None:
            self.output_path = str(PurePosixPath(self.input_path).with_suffix(".pdf"))
        return self


# --- paths ---------------------------------------------------------------------------------------


def storage_root() -> Path:
    raw = env.get(env.STORAGE_ROOT)
    if not raw:
        raise PermanentError(f"{env.STORAGE_ROOT} is not set; document.convert has no storage root")
    root = Path(raw)
    if not root.is_absolute():
        raise PermanentError(f"{env.STORAGE_ROOT}={raw!r} must be an absolute path")
    try:
        resolved = root.resolve(strict=True)
    except OSError as exc:
        raise PermanentError(f"{env.STORAGE_ROOT}={raw!r} does not exist: {exc}") from None
    if not resolved.is_dir():
        raise PermanentError(f"{env.STORAGE_ROOT}={raw!r} is not a directory")
    return resolved


def inside_root(root: Path, relative: str, what: str) -> Path:
    """`root / relative` with symlinks resolved; PermanentError unless it stays inside `root`."""
    try:
        check_relative(relative)
    except ValueError as exc:
        raise PermanentError(f"{what}: {exc}") from None
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise PermanentError(
            f"{what} {relative!r} resolves to {str(resolved)!r}, outside the storage root"
        )
    return resolved


def find_soffice() -> str:
    configured = env.get(env.SOFFICE_PATH)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise PermanentError(f"{env.SOFFICE_PATH}={configured!r} is not an executable file")
        return configured
    found = shutil.which("soffice") or shutil.which("libreoffice")
    if found is None:
        raise PermanentError(INSTALL_HINT)
    return found


# --- the conversion ----------------------------------------------------------------------------


async def _run(argv: list[str], timeout: float, environ: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=environ,
        start_new_session=True,  # soffice forks soffice.bin: kill the whole group on timeout
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    lines = output.decode(errors="replace").splitlines()
    # soffice always warns about Java on headless installs; it says nothing about the document.
    relevant = [line for line in lines if "javaldx" not in line]
    return process.returncode or 0, "\n".join(relevant)


async def convert_to_pdf(input_path: str, output_path: str) -> dict[str, Any]:
    """Step: convert `input_path` to `output_path` (both relative to the storage root)."""
    root = storage_root()
    source = inside_root(root, input_path, "input")
    target = inside_root(root, output_path, "output")
    if not source.is_file():
        raise PermanentError(f"input {input_path!r} does not exist in the storage root")
    if not zipfile.is_zipfile(source):  # every accepted format is a ZIP container; LibreOffice
        # would otherwise import any other bytes as plain text and "convert" them
        raise PermanentError(
            f"input {input_path!r} is not a valid {source.suffix.lower()} document "
            "(not a ZIP container)"
        )
    soffice = find_soffice()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.parent.resolve().is_relative_to(root):  # created through a symlink meanwhile
        raise PermanentError(f"output {output_path!r} is outside the storage root")

    with tempfile.TemporaryDirectory(prefix="jobyard-soffice-") as scratch:
        profile = Path(scratch, "profile")
        outdir = Path(scratch, "out")
        outdir.mkdir()
        argv = [
            soffice,
            "--headless",
            "--norestore",
            "--nolockcheck",
            "--nodefault",
            "--nologo",
            f"-env:UserInstallation={profile.as_uri()}",
            "--convert-to",
            "pdf",
            "--outdir",
            str(outdir),
            str(source),
        ]
        environ = {**os.environ, "HOME": scratch}
        try:
            code, output = await _run(argv, CONVERT_TIMEOUT, environ)
        except TimeoutError:
            raise DocumentRetryableError(
                f"soffice did not finish converting {input_path!r} within {CONVERT_TIMEOUT:g} s"
            ) from None
        produced = outdir / f"{source.stem}.pdf"
        if code != 0:
            raise DocumentRetryableError(
                f"soffice exited with {code} converting {input_path!r}: {output.strip()[-500:]}"
            )
        if not produced.is_file() or produced.stat().st_size == 0:
            raise PermanentError(
                f"LibreOffice could not convert {input_path!r} (is it a valid document?): "
                f"{output.strip()[-500:] or 'no output'}"
            )
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.copyfile(produced, partial)
        os.replace(partial, target)
    return {"input_path": input_path, "output_path": output_path, "bytes": target.stat().st_size}


@job(
    "document.convert",
    queue="data-sync",
    payload=ConvertPayload,
    retry=RetryPolicy(attempts=3, backoff=5.0),
    timeout=TIMEOUT_SECONDS,
    requires_env=(env.STORAGE_ROOT,),
)
async def convert(ctx: JobContext, payload: ConvertPayload) -> dict[str, Any]:
    """Convert an office document under the storage root to PDF with LibreOffice."""
    # A step's result comes back as JSON (replayed on a resume), so ctx.run returns Any.
    result: dict[str, Any] = await ctx.run(
        "convert", convert_to_pdf, payload.input_path, payload.output_path
    )
    return result

"""Errors that job authors and callers see; engines translate their own errors into these."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The error class of a job whose process died under its last attempt, on either engine (a step
#: that killed it, a segfault, the OOM killer, a host lost): `error_class` in the job log.
WORKER_PROCESS_DIED = "WorkerProcessDied"


class JobyardError(Exception):
    """Base of every error jobyard raises on purpose."""


class UnknownJobError(JobyardError, LookupError):
    """No job is declared under this name."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        hint = f" (known jobs: {', '.join(sorted(known))})" if known else ""
        super().__init__(f"unknown job {name!r}{hint}")
        self.name = name


class InvalidPayloadError(JobyardError, ValueError):
    """The payload does not match the job's schema, or is not JSON."""

    def __init__(
        self, name: str, reason: str, errors: Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        super().__init__(f"invalid payload for job {name!r}: {reason}")
        self.name = name
        self.reason = reason
        self.errors = errors or []


class FlowDeclarationError(JobyardError, ValueError):
    """A flow declaration that cannot be honoured (a limit below 1, a key the payload lacks)."""


class PermanentError(JobyardError):
    """Raise from a step to fail the job at once: retrying cannot help (a 404, a bad address)."""


class StepError(PermanentError):
    """A step was declared or used in a way that cannot be recorded or replayed.

    A bug in the job's code, so permanent: every engine fails the job at once rather than retry."""


class MissingSettingError(JobyardError):
    """The job needs an environment variable that is not set."""

    def __init__(self, name: str, missing: list[str]) -> None:
        super().__init__(f"job {name!r} cannot run: set {', '.join(missing)}")
        self.name = name
        self.missing = missing


class PayloadTooLargeError(InvalidPayloadError):
    """The payload's JSON is larger than JOBYARD_MAX_PAYLOAD_BYTES (HTTP 413).

    A subclass of InvalidPayloadError, so code that refuses bad payloads refuses these too.
    """

    def __init__(self, name: str, size: int, limit: int) -> None:
        super().__init__(name, f"the payload is {size} bytes of JSON; the limit is {limit}")
        self.size = size
        self.limit = limit


class IdempotencyConflictError(JobyardError):
    """A job id is already taken by another job name or another payload (HTTP 409).

    A second dispatch with the same id is only a harmless duplicate when it asks for the same
    job with the same payload; anything else would silently drop the caller's job.
    """

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job id {job_id!r} is taken: {reason}")
        self.job_id = job_id
        self.reason = reason


class UnsafeURLError(PermanentError, ValueError):
    """An outbound URL points somewhere jobyard must not reach (loopback, private, link-local,
    ...) and is not in JOBYARD_WEBHOOK_ALLOW. Permanent: retrying cannot make it safe."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"refusing {url!r}: {reason}")
        self.url = url
        self.reason = reason


class ChildFailedError(PermanentError):
    """A child job (`ctx.child`, `ctx.children`) ended failed, dead or cancelled.

    Raised in the parent, which may catch it. Permanent: the child's outcome is recorded, so a
    retry of the parent would meet the same ending; uncaught, the parent ends failed."""

    def __init__(self, job_id: str, state: str, error: str | None) -> None:
        super().__init__(f"child job {job_id} ended {state}" + (f": {error}" if error else ""))
        self.job_id = job_id
        self.state = state
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with its three fields
        return (type(self), (self.job_id, self.state, self.error))


class UpstreamFailedError(JobyardError):
    """A job dispatched with `after=[...]` (and `after_failure="cancel"`, the default) found one
    of those jobs ended failed, dead or cancelled: it ends `cancelled` without running, with
    this error's message, which names that job, as its reason."""

    def __init__(self, job_id: str, state: str, error: str | None) -> None:
        super().__init__(f"upstream job {job_id} ended {state}" + (f": {error}" if error else ""))
        self.job_id = job_id
        self.state = state
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job_id, self.state, self.error))

"""Caller-chosen job ids: an idempotency key the caller may dispatch again at any time, so the
id registry (owners.py) says which engine the id belongs to before either engine is touched.
Generated ids skip this: nobody can dispatch them again before learning them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from jobyard.dispatcher.engines import ClaimMode, Submission, SubmitStatus
from jobyard.dispatcher.errors import (
    DispatchOutcomeUnknownError,
    DispatchUnavailableError,
    EngineUnavailable,
    IdempotencyConflictError,
)
from jobyard.dispatcher.models import FALLBACK_OWNED_BY_TEMPORAL, JobHandle
from jobyard.dispatcher.owners import Owner, OwnerRegistry, payload_digest
from jobyard.dispatcher.routing import Router
from jobyard.job_engine import JobyardError, get_spec


class CallerIds:
    """Routes jobs whose id the caller chose, through the id registry."""

    def __init__(self, router: Router, owners: OwnerRegistry) -> None:
        self.router = router
        self.owners = owners

    def registered_owner(self, job: Submission) -> Owner | None:
        """Who the registry says has this caller-chosen id, if anyone (a conflict raises)."""
        with self.registry_errors(job):
            owner = self.owners.owner(job.job_id)
        if owner is not None:
            check_same_job(job, owner, payload_digest(job.payload))
        return owner

    @contextlib.contextmanager
    def registry_errors(self, job: Submission) -> Iterator[None]:
        try:
            yield
        except EngineUnavailable as exc:
            raise DispatchUnavailableError(
                f"job {job.name!r} ({job.job_id}) was not started: {exc}. A job with a "
                "caller-chosen id needs the job id registry (DATABASE_URL, migrated)."
            ) from exc

    def route(self, job: Submission, owner: Owner | None) -> JobHandle:
        """A caller-chosen id may have been dispatched before, anywhere: the registry decides
        which engine it belongs to, before either engine is touched."""
        if owner is None:
            digest = payload_digest(job.payload)
            preferred = self.router.preferred_engine()
            with self.registry_errors(job):
                owner = self.owners.claim(job.job_id, preferred, job.name, digest)
            if owner == Owner(preferred, job.name, digest):  # ours, or an identical twin's
                return self.router.route(job, registered=True)
            check_same_job(job, owner, digest)  # a concurrent dispatch claimed it first
        return self.redispatch(job, owner)

    def redispatch(self, job: Submission, owner: Owner) -> JobHandle:
        """The id is `owner.engine`'s: give it there again. That engine dedupes it; a job whose
        dispatch died between the claim and the start (or that Redis lost) starts now."""
        router = self.router
        if owner.finished:
            return JobHandle(job.job_id, owner.engine, duplicate=True)
        if owner.engine == router.temporal.name:
            return router.to_temporal(job, FALLBACK_OWNED_BY_TEMPORAL, ClaimMode.NONE, known=True)
        if router.breaker.is_open:
            return JobHandle(job.job_id, router.dramatiq.name, duplicate=True)
        try:
            submitted = router.dramatiq.submit(job)
        except EngineUnavailable as exc:
            router.breaker.trip(exc.reason)
            raise DispatchOutcomeUnknownError(
                f"job {job.name!r} ({job.job_id}) is Dramatiq's, and {exc}: it may be queued "
                "there already. Dispatch again with the same job_id once Redis answers.",
                job.job_id,
            ) from exc
        if submitted.status == SubmitStatus.STARTED:
            return JobHandle(job.job_id, router.dramatiq.name)
        if submitted.status == SubmitStatus.DUPLICATE:
            return JobHandle(job.job_id, router.dramatiq.name, duplicate=True)
        return router.to_temporal(job, FALLBACK_OWNED_BY_TEMPORAL, ClaimMode.NONE, registered=True)

    def claim_many(
        self,
        chosen: list[tuple[int, Submission]],
        results: list[JobHandle | Exception | None],
    ) -> list[tuple[int, Submission, bool]]:
        """The registry's part of `dispatch_many` for caller-chosen ids, in the order `dispatch`
        takes it: conflicts, then settings, then the claim. Jobs whose id was dispatched before
        get their result here; returns those now claimed for the preferred engine."""
        if not chosen:
            return []
        try:
            with self.registry_errors(chosen[0][1]):
                owners = self.owners.owners([job.job_id for _, job in chosen])
        except DispatchUnavailableError as exc:
            for index, _ in chosen:
                results[index] = exc
            return []
        unclaimed: list[tuple[int, Submission, str]] = []
        for index, job in chosen:
            try:
                digest = payload_digest(job.payload)
                owner = owners.get(job.job_id)
                if owner is not None:
                    check_same_job(job, owner, digest)
                get_spec(job.name).check_environment()
                if owner is not None:
                    results[index] = self.redispatch(job, owner)
                else:
                    unclaimed.append((index, job, digest))
            except (JobyardError, ValueError) as exc:
                results[index] = exc
        preferred = self.router.preferred_engine()
        try:
            with self.registry_errors(chosen[0][1]):
                claimed = self.owners.claim_many(
                    [(job.job_id, job.name, digest) for _, job, digest in unclaimed], preferred
                )
        except DispatchUnavailableError as exc:
            for index, _, _ in unclaimed:
                results[index] = exc
            return []
        ready: list[tuple[int, Submission, bool]] = []
        for index, job, digest in unclaimed:
            owner = claimed[job.job_id]
            if owner == Owner(preferred, job.name, digest):  # ours, or an identical twin's
                ready.append((index, job, True))
                continue
            try:  # a concurrent dispatch claimed it first
                check_same_job(job, owner, digest)
                results[index] = self.redispatch(job, owner)
            except (JobyardError, ValueError) as exc:
                results[index] = exc
        return ready


def check_same_job(job: Submission, owner: Owner, digest: str) -> None:
    if owner.name != job.name:
        raise IdempotencyConflictError(job.job_id, f"it was dispatched as job {owner.name!r}")
    if owner.payload_digest is not None and owner.payload_digest != digest:
        raise IdempotencyConflictError(job.job_id, "it was dispatched with another payload")

"""Which engine takes a job: steps 2-7 of the dispatch contract (step 1, the checks, is
submission.py; caller-chosen ids first go through caller_ids.py; all seven: docs/architecture.md).

2. USE_DRAMATIQ=false -> the fallback engine (Temporal);  3. the preferred engine's circuit
open -> the fallback;  4-5. the preferred engine (Dramatiq: one Lua call checks live workers for
the queue, dedupes the job id and enqueues) says whether it took the job; no live worker or an
error -> the fallback with the same job id;  6. the fallback is told how to claim the job from
the preferred engine (`ClaimMode`), so that exactly one engine runs it;  7. if the fallback
fails too, the caller gets DispatchUnavailableError and nothing is half-started.

The router holds two `Engine`s, whatever they are: `dramatiq` is the preferred one, `temporal`
the one that takes what it cannot (named for the engines they are in production).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jobyard.dispatcher.breaker import CircuitBreaker
from jobyard.dispatcher.engines import (
    ClaimMode,
    Engine,
    NewJob,
    ReleaseStatus,
    Submission,
    SubmitStatus,
    Submitted,
    as_submission,
)
from jobyard.dispatcher.errors import (
    DispatchOutcomeUnknownError,
    DispatchUnavailableError,
    EngineUnavailable,
    JobNotFoundError,
)
from jobyard.dispatcher.logged import logged_status
from jobyard.dispatcher.models import (
    FALLBACK_FLAG_OFF,
    FALLBACK_NO_WORKERS,
    FALLBACK_OWNED_BY_TEMPORAL,
    FALLBACK_REDIS_ERROR,
    FALLBACK_REDIS_UNHEALTHY,
    EngineName,
    JobHandle,
    JobStatus,
)
from jobyard.dispatcher.owners import OwnerRegistry
from jobyard.dispatcher.upstream import record_upstream
from jobyard.job_engine import JobyardError, env
from jobyard.job_engine.lifecycle import dispatched_event

log = logging.getLogger("jobyard.dispatcher")


class Router:
    """Sends each job to `dramatiq` (preferred) or `temporal` (fallback) and looks jobs up."""

    def __init__(
        self, dramatiq: Engine, temporal: Engine, breaker: CircuitBreaker, owners: OwnerRegistry
    ) -> None:
        self.dramatiq = dramatiq
        self.temporal = temporal
        self.breaker = breaker
        self.owners = owners

    def preferred_engine(self) -> EngineName:
        use_dramatiq = env.get_bool(env.USE_DRAMATIQ) and not self.breaker.is_open
        return self.dramatiq.name if use_dramatiq else self.temporal.name

    def route(self, job: Submission, *, registered: bool = False) -> JobHandle:
        """`registered`: the id has a row in the registry, to move along if the job moves."""
        if not env.get_bool(env.USE_DRAMATIQ):
            return self._flag_off(job)
        if self.breaker.is_open:
            return self.to_temporal(
                job, FALLBACK_REDIS_UNHEALTHY, ClaimMode.BEST_EFFORT, registered=registered
            )
        try:
            submitted: Submitted | EngineUnavailable = self.dramatiq.submit(job)
        except EngineUnavailable as exc:
            self.breaker.trip(exc.reason)
            submitted = exc
        return self.after_dramatiq(job, submitted, registered=registered)

    def route_many(
        self, jobs: Iterable[tuple[Submission | NewJob, bool]], *, streamed: bool = False
    ) -> list[JobHandle | Exception]:
        """`route` of many jobs: Dramatiq takes them in batches; each job it cannot take goes
        to Temporal on its own, exactly as `route` sends it. `streamed`: `jobs` is made as it
        is read (Dramatiq sends the first batches before the last are made)."""
        if not env.get_bool(env.USE_DRAMATIQ) or self.breaker.is_open:
            return [result_of(self.route, as_submission(job), registered=r) for job, r in jobs]
        routed: list[tuple[Submission | NewJob, bool]] = []

        def submissions() -> Iterator[Submission | NewJob]:
            for job, registered in jobs:
                routed.append((job, registered))
                yield job

        submitted = self.dramatiq.submit_batch(submissions() if streamed else list(submissions()))
        for outcome in submitted:
            if isinstance(outcome, EngineUnavailable):
                self.breaker.trip(outcome.reason)
                break
        return [
            JobHandle(job.job_id, self.dramatiq.name)
            if isinstance(outcome, Submitted) and outcome.status == SubmitStatus.STARTED
            else result_of(self.after_dramatiq, as_submission(job), outcome, registered=registered)
            for (job, registered), outcome in zip(routed, submitted, strict=True)
        ]

    def after_dramatiq(
        self, job: Submission, submitted: Submitted | EngineUnavailable, *, registered: bool
    ) -> JobHandle:
        """The handle for what Dramatiq answered, or Temporal's when it did not take the job."""
        if isinstance(submitted, EngineUnavailable):
            claim = ClaimMode.STRICT if submitted.ambiguous else ClaimMode.BEST_EFFORT
            return self.to_temporal(job, FALLBACK_REDIS_ERROR, claim, registered=registered)
        if submitted.status == SubmitStatus.STARTED:
            return JobHandle(job.job_id, self.dramatiq.name)
        if submitted.status == SubmitStatus.DUPLICATE:
            return JobHandle(job.job_id, self.dramatiq.name, duplicate=True)
        reason = (
            FALLBACK_NO_WORKERS
            if submitted.status == SubmitStatus.NO_WORKERS
            else FALLBACK_OWNED_BY_TEMPORAL
        )
        return self.to_temporal(job, reason, ClaimMode.NONE, registered=registered)

    def _flag_off(self, job: Submission) -> JobHandle:
        """Claim the job for Temporal here when Redis answers: cheaper than the workflow's claim."""
        claim = ClaimMode.BEST_EFFORT
        if not self.breaker.is_open:
            try:
                released = self.dramatiq.release(job.job_id, job.name, job.queue)
            except EngineUnavailable as exc:
                self.breaker.trip(exc.reason)
            else:
                if released.status == ReleaseStatus.KEPT:  # dispatched to Dramatiq before the flag
                    return JobHandle(job.job_id, self.dramatiq.name, duplicate=True)
                claim = ClaimMode.NONE
        return self.to_temporal(job, FALLBACK_FLAG_OFF, claim)

    def to_temporal(
        self,
        job: Submission,
        reason: str,
        claim: ClaimMode,
        *,
        registered: bool = False,
        known: bool = False,
    ) -> JobHandle:
        """`known`: the id was given to Temporal before, so it may exist there already."""
        job = dataclasses.replace(job, fallback_reason=reason, claim=claim)
        if registered:
            self.moved_to_temporal(job)
        try:
            submitted = self.temporal.submit(job)
        except EngineUnavailable as exc:
            if exc.ambiguous or known or claim == ClaimMode.STRICT:
                # Temporal, or before it Redis, may have taken the job: "not started" could lie.
                raise DispatchOutcomeUnknownError(
                    f"job {job.name!r} ({job.job_id}) may have started: Dramatiq skipped "
                    f"({reason}) and {exc}. Dispatch again with the same job_id: it is safe.",
                    job.job_id,
                ) from exc
            raise DispatchUnavailableError(
                f"job {job.name!r} ({job.job_id}) was not started: Dramatiq skipped ({reason}) "
                f"and {exc}. Retry the dispatch with the same job_id."
            ) from exc
        duplicate = submitted.status == SubmitStatus.DUPLICATE
        return JobHandle(
            job.job_id, self.temporal.name, fallback_reason=reason, duplicate=duplicate
        )

    def moved_to_temporal(self, job: Submission) -> None:
        """Best effort: Redis records the move too, and a later dispatch asks Redis first."""
        try:
            self.owners.move(job.job_id, self.dramatiq.name, self.temporal.name)
        except EngineUnavailable:
            log.warning("job %s moved to Temporal; the registry could not record it", job.job_id)

    def status(self, job_id: str) -> JobStatus:
        if not self.breaker.is_open:
            try:
                found = self.dramatiq.status(job_id)
            except EngineUnavailable as exc:
                self.breaker.trip(exc.reason)
            else:
                if found is not None:
                    return found
        found = self.temporal.status(job_id) or logged_status(job_id)
        if found is None:
            raise JobNotFoundError(job_id)
        return found


def record_dispatch(job: Submission, handle: JobHandle, started: float) -> None:
    """The job log's "queued", written by this process even for a job Dramatiq took: it is how
    a job accepted by a Redis that then restarts empty is found and enqueued again (the rescue's
    `recover_lost`). Sent through Redis's own outbox instead, it died with the job (measured:
    5 of 300 jobs lost in the fault suite's "redis restarted empty")."""
    if not handle.duplicate:
        delay = job.options.delay
        run_at = started + delay if delay else None
        # Only Dramatiq parks a job held at dispatch; another engine's run asks the limit itself.
        hold = job.hold if handle.engine == "dramatiq" else None
        if hold is not None:
            run_at = hold.until or run_at
        dispatched_event(
            job.job_id, job.name, job.queue, handle.engine, job.payload, handle.fallback_reason,
            started, run_at, (hold.display_state, hold.waiting_reason) if hold else None,
        )  # fmt: skip
        if job.options.after:
            record_upstream([(job.job_id, job.options.after)])


def result_of(route: Callable[..., JobHandle], *args: Any, **kwargs: Any) -> JobHandle | Exception:
    """A per-job routing call whose error is that job's result (`dispatch_many`)."""
    try:
        return route(*args, **kwargs)
    except (JobyardError, ValueError) as exc:
        return exc

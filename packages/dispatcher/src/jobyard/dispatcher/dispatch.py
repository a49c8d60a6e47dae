"""dispatch_job(): validate, pick an engine, start the job once.

The steps follow DESIGN.md's dispatch contract:
1. validate name and payload;  2. USE_DRAMATIQ=false -> Temporal;  3. Redis circuit open ->
Temporal;  4-5. one Lua call checks live workers for the queue, dedupes the job id and enqueues;
no live worker or a Redis error -> Temporal with the same job id;  6. the Temporal workflow is
told how to claim the job from Redis so that exactly one engine runs it;  7. if Temporal fails
too, the caller gets DispatchUnavailableError and nothing is half-started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from jobyard.dispatcher.breaker import CircuitBreaker
from jobyard.dispatcher.engines import (
    ClaimMode,
    Engine,
    ReleaseStatus,
    Submission,
    SubmitStatus,
    Submitted,
)
from jobyard.dispatcher.engines.dramatiq import DramatiqEngine
from jobyard.dispatcher.engines.dramatiq.engine import NewJob
from jobyard.dispatcher.errors import (
    DispatchOutcomeUnknownError,
    DispatchUnavailableError,
    EngineUnavailable,
    IdempotencyConflictError,
    JobNotFoundError,
)
from jobyard.dispatcher.logged import logged_status
from jobyard.dispatcher.models import (
    FALLBACK_FLAG_OFF,
    FALLBACK_NO_WORKERS,
    FALLBACK_OWNED_BY_TEMPORAL,
    FALLBACK_REDIS_ERROR,
    FALLBACK_REDIS_UNHEALTHY,
    NO_OPTIONS,
    DispatchOptions,
    DispatchRequest,
    EngineName,
    JobHandle,
    JobStatus,
)
from jobyard.dispatcher.owners import Owner, OwnerRegistry, payload_digest
from jobyard.job_engine import (
    JobyardError,
    RetryPolicy,
    UnsafeURLError,
    children,
    env,
    get_spec,
    netguard,
    tracing,
)
from jobyard.job_engine.collector import collector_paused
from jobyard.job_engine.db.readiness import check_setup
from jobyard.job_engine.ids import new_job_id, new_job_ids
from jobyard.job_engine.lifecycle import dispatched_batch_event, dispatched_event
from jobyard.job_engine.registry import load_job_modules
from jobyard.queue.client import get_client
from jobyard.queue.direct import DirectJobStore

if TYPE_CHECKING:
    from jobyard.dispatcher.engines.temporal import TemporalEngine

log = logging.getLogger("jobyard.dispatcher")
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}")
MAX_DELAY_SECONDS = 7 * 24 * 3600  # Dramatiq's delay limit; Temporal would allow more


def _check_job_id(job_id: str | None) -> str:
    if job_id is None:
        return new_job_id()
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(
            f"invalid job_id {job_id!r}: 1-200 characters of letters, digits and ._:@/- "
            "starting with a letter or digit"
        )
    return job_id


def _check_webhook_url(url: str | None) -> str | None:
    if url is None:
        return None
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"invalid webhook_url {url!r}: an http(s) URL is required")
    try:
        return netguard.check_url(url)  # a literal private address is refused here already
    except UnsafeURLError as exc:
        raise ValueError(f"invalid webhook_url {url!r}: {exc.reason}") from exc


def _check_retry(retry: RetryPolicy | None) -> dict[str, Any] | None:
    if retry is None:
        return None
    if not isinstance(retry, RetryPolicy):
        raise ValueError(f"invalid retry {retry!r}: a jobyard.job_engine.RetryPolicy is required")
    return retry.overrides()


def _check_delay(delay: float | None) -> float | None:
    if delay is None:
        return None
    if not isinstance(delay, int | float) or delay < 0 or delay > MAX_DELAY_SECONDS:
        raise ValueError(f"invalid delay {delay!r}: seconds between 0 and {MAX_DELAY_SECONDS}")
    return float(delay) or None


class Dispatcher:
    """Routes each job to an engine. `dramatiq` is preferred; `temporal` takes what it cannot."""

    def __init__(
        self,
        dramatiq: DramatiqEngine,
        temporal: TemporalEngine,
        breaker: CircuitBreaker,
        owners: OwnerRegistry | None = None,
    ) -> None:
        self.dramatiq = dramatiq
        self.temporal = temporal
        self.breaker = breaker
        self.owners = owners or OwnerRegistry()

    @classmethod
    def from_env(cls) -> Dispatcher:
        # Imported here, not at the top: temporalio takes half a second to import, which a
        # process that imports the dispatcher but never builds one (a worker) need not pay.
        from jobyard.dispatcher.engines.temporal import TemporalEngine

        tracing.setup_from_env()  # before the Temporal client connects: it takes the tracer
        client = get_client()
        temporal = TemporalEngine(
            env.get_str(env.TEMPORAL_ADDRESS),
            env.get_str(env.TEMPORAL_NAMESPACE),
            env.get_str(env.TEMPORAL_TASK_QUEUE),
            env.get_float(env.TEMPORAL_START_TIMEOUT),
        )
        temporal.warm_up()
        breaker = CircuitBreaker(client.ping, env.get_float(env.BREAKER_PROBE_INTERVAL))
        # check_closed: a dead Redis must be "not started" (a clean fallback), not an ambiguous
        # send on a connection the server closed (a claim that waits for Redis).
        store = DirectJobStore(client, check_closed=True)
        dramatiq = DramatiqEngine(store, env.get_float(env.WORKER_HEARTBEAT_TIMEOUT))
        return cls(dramatiq, temporal, breaker)

    @property
    def engines(self) -> tuple[Engine, ...]:
        """Every engine a job may be on, in the order to look for it."""
        return (self.dramatiq, self.temporal)

    def dispatch(
        self,
        name: str,
        payload: Any,
        *,
        job_id: str | None = None,
        delay: float | None = None,
        webhook_url: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> JobHandle:
        job = _submission(name, payload, job_id, delay, webhook_url, retry)
        # An id taken by another job is a conflict whatever this process's settings are.
        owner = self._registered_owner(job) if job_id is not None else None
        get_spec(job.name).check_environment()
        started = time.time()
        handle = self._route(job) if job_id is None else self._route_caller_id(job, owner)
        _record_dispatch(job, handle, started)
        return handle

    def dispatch_many(
        self, requests: Iterable[DispatchRequest | tuple[str, Any]]
    ) -> list[JobHandle | Exception]:
        """`dispatch` of many jobs with the same checks and guarantees, in batches: one Lua call
        per batch of a queue's jobs, one registry statement per batch of caller-chosen ids. One
        result per request, in order: its handle, or the error `dispatch` would have raised
        for it (the other jobs are dispatched all the same)."""
        started = time.time()
        listed = list(requests)
        results: list[JobHandle | Exception | None] = [None] * len(listed)
        plain: list[int] = []
        others: list[int] = []
        for index, request in enumerate(listed):
            (plain if _is_plain(request) else others).append(index)
        with collector_paused():
            if plain:
                self._dispatch_plain(listed, plain, results, started)
            if others:
                self._dispatch_others(listed, others, results, started)
        return [_settled(result) for result in results]

    def _dispatch_plain(
        self,
        requests: list[DispatchRequest | tuple[str, Any]],
        indices: list[int],
        results: list[JobHandle | Exception | None],
        started: float,
    ) -> None:
        """Jobs with generated ids and no options, the bulk of a bulk dispatch: validated a
        chunk at a time while Dramatiq sends the chunk before."""
        order: list[tuple[int, NewJob]] = []  # what the jobs stream gave, in order
        jobs = _plain_jobs(requests, indices, results, order)
        outcomes = self._route_many(((job, False) for job in jobs), streamed=True)
        # The jobs Dramatiq took, each name's in one job log entry (they all carry their
        # payload's JSON text); the rest (Temporal's) one by one, as `dispatch` records them.
        taken: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
        for (index, job), outcome in zip(order, outcomes, strict=True):
            results[index] = outcome
            if (
                isinstance(outcome, JobHandle)
                and outcome.engine == "dramatiq"
                and not outcome.duplicate
                and outcome.fallback_reason is None
                and job.payload_json is not None
            ):
                taken.setdefault((job.name, job.queue), []).append((job.job_id, job.payload_json))
            elif isinstance(outcome, JobHandle):
                _record_dispatch(job.submission(), outcome, started)
        for (name, queue), queued in taken.items():
            dispatched_batch_event(name, queue, "dramatiq", queued, started)

    def _dispatch_others(
        self,
        requests: list[DispatchRequest | tuple[str, Any]],
        indices: list[int],
        results: list[JobHandle | Exception | None],
        started: float,
    ) -> None:
        """Jobs with a caller-chosen id or options: `dispatch`'s path, batched."""
        generated: list[tuple[int, Submission]] = []
        chosen: list[tuple[int, Submission]] = []
        for index in indices:
            request = requests[index]
            if isinstance(request, tuple):
                request = DispatchRequest(*request)
            try:
                job = _submission(
                    request.name, request.payload, request.job_id, request.delay,
                    request.webhook_url, request.retry,
                )  # fmt: skip
            except (JobyardError, ValueError) as exc:
                results[index] = exc
                continue
            (generated if request.job_id is None else chosen).append((index, job))
        for index, job in generated:
            try:
                get_spec(job.name).check_environment()
            except JobyardError as exc:
                results[index] = exc
        ready = [(index, job, False) for index, job in generated if results[index] is None]
        ready += self._claim_many(chosen, results)
        outcomes = self._route_many([(job, registered) for _, job, registered in ready])
        for (index, _, _), outcome in zip(ready, outcomes, strict=True):
            results[index] = outcome
        for index, job in (*generated, *chosen):
            result = results[index]
            if isinstance(result, JobHandle):
                _record_dispatch(job, result, started)

    def _claim_many(
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
            with self._registry_errors(chosen[0][1]):
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
                    _check_same_job(job, owner, digest)
                get_spec(job.name).check_environment()
                if owner is not None:
                    results[index] = self._redispatch(job, owner)
                else:
                    unclaimed.append((index, job, digest))
            except (JobyardError, ValueError) as exc:
                results[index] = exc
        preferred = self._preferred_engine()
        try:
            with self._registry_errors(chosen[0][1]):
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
                _check_same_job(job, owner, digest)
                results[index] = self._redispatch(job, owner)
            except (JobyardError, ValueError) as exc:
                results[index] = exc
        return ready

    def _route_many(
        self, jobs: Iterable[tuple[Submission | NewJob, bool]], *, streamed: bool = False
    ) -> list[JobHandle | Exception]:
        """`_route` of many jobs: Dramatiq takes them in batches; each job it cannot take goes
        to Temporal on its own, exactly as `_route` sends it. `streamed`: `jobs` is made as it
        is read (Dramatiq sends the first batches before the last are made)."""
        if not env.get_bool(env.USE_DRAMATIQ) or self.breaker.is_open:
            return [_result_of(self._route, _submission_of(job), registered=r) for job, r in jobs]
        routed: list[tuple[Submission | NewJob, bool]] = []

        def submissions() -> Iterator[Submission | NewJob]:
            for job, registered in jobs:
                routed.append((job, registered))
                yield job

        submitted = self.dramatiq.submit_many(submissions() if streamed else list(submissions()))
        for outcome in submitted:
            if isinstance(outcome, EngineUnavailable):
                self.breaker.trip(outcome.reason)
                break
        return [
            JobHandle(job.job_id, "dramatiq")
            if isinstance(outcome, Submitted) and outcome.status == SubmitStatus.STARTED
            else _result_of(
                self._after_dramatiq, _submission_of(job), outcome, registered=registered
            )
            for (job, registered), outcome in zip(routed, submitted, strict=True)
        ]

    def _registered_owner(self, job: Submission) -> Owner | None:
        """Who the registry says has this caller-chosen id, if anyone (a conflict raises)."""
        with self._registry_errors(job):
            owner = self.owners.owner(job.job_id)
        if owner is not None:
            _check_same_job(job, owner, payload_digest(job.payload))
        return owner

    @contextlib.contextmanager
    def _registry_errors(self, job: Submission) -> Iterator[None]:
        try:
            yield
        except EngineUnavailable as exc:
            raise DispatchUnavailableError(
                f"job {job.name!r} ({job.job_id}) was not started: {exc}. A job with a "
                "caller-chosen id needs the job id registry (DATABASE_URL, migrated)."
            ) from exc

    def _route_caller_id(self, job: Submission, owner: Owner | None) -> JobHandle:
        """A caller-chosen id may have been dispatched before, anywhere: the registry decides
        which engine it belongs to, before either engine is touched."""
        if owner is None:
            digest = payload_digest(job.payload)
            preferred = self._preferred_engine()
            with self._registry_errors(job):
                owner = self.owners.claim(job.job_id, preferred, job.name, digest)
            if owner == Owner(preferred, job.name, digest):  # ours, or an identical twin's
                return self._route(job, registered=True)
            _check_same_job(job, owner, digest)  # a concurrent dispatch claimed it first
        return self._redispatch(job, owner)

    def _redispatch(self, job: Submission, owner: Owner) -> JobHandle:
        """The id is `owner.engine`'s: give it there again. That engine dedupes it; a job whose
        dispatch died between the claim and the start (or that Redis lost) starts now."""
        if owner.finished:
            return JobHandle(job.job_id, owner.engine, duplicate=True)
        if owner.engine == "temporal":
            return self._to_temporal(job, FALLBACK_OWNED_BY_TEMPORAL, ClaimMode.NONE, known=True)
        if self.breaker.is_open:
            return JobHandle(job.job_id, "dramatiq", duplicate=True)
        try:
            submitted = self.dramatiq.submit(job)
        except EngineUnavailable as exc:
            self.breaker.trip(exc.reason)
            raise DispatchOutcomeUnknownError(
                f"job {job.name!r} ({job.job_id}) is Dramatiq's, and {exc}: it may be queued "
                "there already. Dispatch again with the same job_id once Redis answers.",
                job.job_id,
            ) from exc
        if submitted.status == SubmitStatus.STARTED:
            return JobHandle(job.job_id, "dramatiq")
        if submitted.status == SubmitStatus.DUPLICATE:
            return JobHandle(job.job_id, "dramatiq", duplicate=True)
        return self._to_temporal(job, FALLBACK_OWNED_BY_TEMPORAL, ClaimMode.NONE, registered=True)

    def _moved_to_temporal(self, job: Submission) -> None:
        """Best effort: Redis records the move too, and a later dispatch asks Redis first."""
        try:
            self.owners.move(job.job_id, "dramatiq", "temporal")
        except EngineUnavailable:
            log.warning("job %s moved to Temporal; the registry could not record it", job.job_id)

    def _preferred_engine(self) -> EngineName:
        use_dramatiq = env.get_bool(env.USE_DRAMATIQ) and not self.breaker.is_open
        return "dramatiq" if use_dramatiq else "temporal"

    def _route(self, job: Submission, *, registered: bool = False) -> JobHandle:
        """`registered`: the id has a row in the registry, to move along if the job moves."""
        if not env.get_bool(env.USE_DRAMATIQ):
            return self._flag_off(job)
        if self.breaker.is_open:
            return self._to_temporal(
                job, FALLBACK_REDIS_UNHEALTHY, ClaimMode.BEST_EFFORT, registered=registered
            )
        try:
            submitted: Submitted | EngineUnavailable = self.dramatiq.submit(job)
        except EngineUnavailable as exc:
            self.breaker.trip(exc.reason)
            submitted = exc
        return self._after_dramatiq(job, submitted, registered=registered)

    def _after_dramatiq(
        self, job: Submission, submitted: Submitted | EngineUnavailable, *, registered: bool
    ) -> JobHandle:
        """The handle for what Dramatiq answered, or Temporal's when it did not take the job."""
        if isinstance(submitted, EngineUnavailable):
            claim = ClaimMode.STRICT if submitted.ambiguous else ClaimMode.BEST_EFFORT
            return self._to_temporal(job, FALLBACK_REDIS_ERROR, claim, registered=registered)
        if submitted.status == SubmitStatus.STARTED:
            return JobHandle(job.job_id, "dramatiq")
        if submitted.status == SubmitStatus.DUPLICATE:
            return JobHandle(job.job_id, "dramatiq", duplicate=True)
        reason = (
            FALLBACK_NO_WORKERS
            if submitted.status == SubmitStatus.NO_WORKERS
            else FALLBACK_OWNED_BY_TEMPORAL
        )
        return self._to_temporal(job, reason, ClaimMode.NONE, registered=registered)

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
                    return JobHandle(job.job_id, "dramatiq", duplicate=True)
                claim = ClaimMode.NONE
        return self._to_temporal(job, FALLBACK_FLAG_OFF, claim)

    def _to_temporal(
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
            self._moved_to_temporal(job)
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
        return JobHandle(job.job_id, "temporal", fallback_reason=reason, duplicate=duplicate)

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


def _submission(
    name: str,
    payload: Any,
    job_id: str | None,
    delay: float | None,
    webhook_url: str | None,
    retry: RetryPolicy | None,
) -> Submission:
    """A dispatch's arguments checked and encoded: what crosses to an engine."""
    spec = get_spec(name)
    encoded = spec.encode_with_text(payload)
    if delay is None and webhook_url is None and retry is None:
        options = NO_OPTIONS
    else:
        options = DispatchOptions(
            delay=_check_delay(delay),
            webhook_url=_check_webhook_url(webhook_url),
            retry=_check_retry(retry),
        )
    return Submission(
        _check_job_id(job_id), spec.name, spec.queue, encoded.data, options,
        payload_json=encoded.text,
    )  # fmt: skip


#: Jobs `dispatch_many` validates at a time, while Dramatiq sends the ones before.
PLAIN_CHUNK = 500


def _is_plain(request: DispatchRequest | tuple[str, Any]) -> bool:
    """A job with a generated id and no options: the bulk path of `dispatch_many`."""
    if type(request) is tuple:
        return len(request) == 2
    return (
        isinstance(request, DispatchRequest)
        and request.job_id is None
        and request.delay is None
        and request.webhook_url is None
        and request.retry is None
    )


def _plain_jobs(
    requests: list[DispatchRequest | tuple[str, Any]],
    indices: list[int],
    results: list[JobHandle | Exception | None],
    order: list[tuple[int, NewJob]],
) -> Iterator[NewJob]:
    """The valid jobs among `indices`, checked as `dispatch` checks them, a chunk at a time and
    each chunk's payloads of one job in one call (`JobSpec.encode_many`). A job's error goes to
    `results`; each job made is appended to `order` with its index as it is given out."""
    for start in range(0, len(indices), PLAIN_CHUNK):
        chunk = indices[start : start + PLAIN_CHUNK]
        by_name: dict[str, tuple[list[int], list[Any]]] = {}  # name -> (indices, payloads)
        for index in chunk:
            request = requests[index]
            if isinstance(request, tuple):
                name, payload = request
            else:
                name, payload = request.name, request.payload
            group = by_name.get(name)
            if group is None:
                group = by_name[name] = ([], [])
            group[0].append(index)
            group[1].append(payload)
        job_ids = new_job_ids(len(chunk))
        if len(by_name) == 1:  # one job's payloads (most chunks): already in the callers' order
            for name, (members, payloads) in by_name.items():
                for index, job in _named_jobs(name, members, payloads, job_ids, results):
                    order.append((index, job))
                    yield job
            continue
        made = {
            index: job
            for name, (members, payloads) in by_name.items()
            for index, job in _named_jobs(name, members, payloads, job_ids, results)
        }
        for index in chunk:  # in the callers' order
            made_job = made.get(index)
            if made_job is not None:
                order.append((index, made_job))
                yield made_job


def _named_jobs(
    name: str,
    members: list[int],
    payloads: list[Any],
    job_ids: list[str],
    results: list[JobHandle | Exception | None],
) -> Iterator[tuple[int, NewJob]]:
    """(index, job) of the valid ones of job `name`'s payloads (at `members`), each with an id
    from `job_ids`; the others' errors go to `results`."""
    try:
        spec = get_spec(name)
    except JobyardError as exc:
        for index in members:
            results[index] = exc
        return
    encoded = spec.encode_many(payloads)
    missing: JobyardError | None = None  # a payload's own error comes first, as in `dispatch`
    try:
        spec.check_environment()
    except JobyardError as exc:
        missing = exc
    job_name, queue = spec.name, spec.queue
    for index, outcome in zip(members, encoded, strict=True):
        if isinstance(outcome, JobyardError):
            results[index] = outcome
        elif missing is not None:
            results[index] = missing
        else:
            yield index, NewJob(job_ids.pop(), job_name, queue, outcome.data, outcome.text)


def _record_dispatch(job: Submission, handle: JobHandle, started: float) -> None:
    """The job log's "queued", written by this process even for a job Dramatiq took: it is how
    a job accepted by a Redis that then restarts empty is found and enqueued again (the rescue's
    `recover_lost`). Sent through Redis's own outbox instead, it died with the job (measured:
    5 of 300 jobs lost in the fault suite's "redis restarted empty")."""
    if not handle.duplicate:
        delay = job.options.delay
        dispatched_event(
            job.job_id, job.name, job.queue, handle.engine, job.payload, handle.fallback_reason,
            started, started + delay if delay else None,
        )  # fmt: skip


def _submission_of(job: Submission | NewJob) -> Submission:
    return job if isinstance(job, Submission) else job.submission()


def _settled(result: JobHandle | Exception | None) -> JobHandle | Exception:
    if result is None:
        raise AssertionError("dispatch_many left a job without a result")
    return result


def _result_of(route: Callable[..., JobHandle], *args: Any, **kwargs: Any) -> JobHandle | Exception:
    """A per-job routing call whose error is that job's result (`dispatch_many`)."""
    try:
        return route(*args, **kwargs)
    except (JobyardError, ValueError) as exc:
        return exc


def _check_same_job(job: Submission, owner: Owner, digest: str) -> None:
    if owner.name != job.name:
        raise IdempotencyConflictError(job.job_id, f"it was dispatched as job {owner.name!r}")
    if owner.payload_digest is not None and owner.payload_digest != digest:
        raise IdempotencyConflictError(job.job_id, "it was dispatched with another payload")


_default: Dispatcher | None = None
_default_lock = threading.Lock()


def get_dispatcher() -> Dispatcher:
    """The process's dispatcher, built from the environment on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Dispatcher.from_env()
    return _default


def warm_up() -> Dispatcher:
    """Do the start-up work now, not in the first request: import every job module and connect
    to Temporal in the background. Call it when the web app starts."""
    load_job_modules()
    check_setup()  # one line naming what is missing or unmigrated, if anything
    return get_dispatcher()


def reset_dispatcher() -> None:
    """Forget the process's dispatcher, so the next call reads the environment again."""
    global _default
    _default = None


def dispatch_job(
    name: str,
    payload: Any,
    *,
    job_id: str | None = None,
    delay: float | None = None,
    webhook_url: str | None = None,
    retry: RetryPolicy | None = None,
) -> JobHandle:
    """Start job `name` with `payload`; returns at once with the job id and the engine chosen.

    Raises UnknownJobError or InvalidPayloadError (nothing started) on bad input, and
    DispatchUnavailableError when neither Dramatiq nor Temporal can take the job.
    A caller-supplied `job_id` is an idempotency key: a second dispatch starts nothing.
    With `webhook_url`, the job's final state is POSTed there (signed) by `webhook.deliver`.
    `retry` overrides the job's attempts and backoff for this dispatch.
    """
    dispatcher = get_dispatcher()  # first: building it turns tracing on if configured
    if tracing.ACTIVE:  # off: this check is all tracing costs a dispatch
        return tracing.traced_dispatch(
            dispatcher.dispatch, name, payload, job_id=job_id, delay=delay,
            webhook_url=webhook_url, retry=retry,
        )  # fmt: skip
    return dispatcher.dispatch(
        name, payload, job_id=job_id, delay=delay, webhook_url=webhook_url, retry=retry
    )


async def adispatch_job(
    name: str,
    payload: Any,
    *,
    job_id: str | None = None,
    delay: float | None = None,
    webhook_url: str | None = None,
    retry: RetryPolicy | None = None,
) -> JobHandle:
    """dispatch_job for async web code; never blocks the event loop."""
    return await asyncio.to_thread(
        dispatch_job, name, payload, job_id=job_id, delay=delay, webhook_url=webhook_url,
        retry=retry,
    )  # fmt: skip


def dispatch_many(
    requests: Iterable[DispatchRequest | tuple[str, Any]],
) -> list[JobHandle | Exception]:
    """Start many jobs in batches; one result per request, in order: its JobHandle, or the
    exception `dispatch_job` would have raised for it (the other jobs start all the same).

    >>> results = dispatch_many([("email.send", {"to": a, ...}) for a in addresses])
    >>> failed = [r for r in results if isinstance(r, Exception)]

    Each request is a `DispatchRequest` (all of `dispatch_job`'s arguments) or a (name, payload)
    pair. The checks, the job id rules and the fallback are `dispatch_job`'s: Dramatiq takes
    the jobs one Lua call per batch; a job it cannot take goes to Temporal on its own.
    """
    dispatcher = get_dispatcher()
    if tracing.ACTIVE:  # one span for the batch: its jobs' runs are its children
        with tracing.span(tracing.DISPATCH_MANY, {}, kind="producer"):
            return dispatcher.dispatch_many(requests)
    return dispatcher.dispatch_many(requests)


async def adispatch_many(
    requests: Iterable[DispatchRequest | tuple[str, Any]],
) -> list[JobHandle | Exception]:
    """dispatch_many for async web code; never blocks the event loop."""
    return await asyncio.to_thread(dispatch_many, list(requests))


def install_child_dispatcher() -> None:
    """Let jobs in this process start child jobs (`jobyard.job_engine.children`) through this
    dispatcher, one at a time or in batches."""

    def one(name: str, payload: Any, job_id: str) -> dict[str, Any]:
        return dispatch_job(name, payload, job_id=job_id).as_dict()

    def many(children: list[tuple[str, Any, str]]) -> list[dict[str, Any] | Exception]:
        requests = [DispatchRequest(name, payload, job_id) for name, payload, job_id in children]
        return [
            result.as_dict() if isinstance(result, JobHandle) else result
            for result in dispatch_many(requests)
        ]

    children.install_dispatcher(one, many)


def get_job(job_id: str) -> JobStatus:
    """The job's engine, state, attempts and result or error, whichever engine ran it."""
    return get_dispatcher().status(job_id)


async def aget_job(job_id: str) -> JobStatus:
    return await asyncio.to_thread(get_job, job_id)

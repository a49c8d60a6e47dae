"""`dispatch_many`: `dispatch` of many jobs with the same checks and guarantees, in batches.

Jobs with generated ids and no options (most of a bulk dispatch) are validated a chunk at a
time, each chunk's payloads of one job in one call, and streamed to the preferred engine as
`NewJob`s while it sends the chunk before; the others take `dispatch`'s path, batched (one
registry statement per batch of caller-chosen ids).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jobyard.dispatcher.caller_ids import CallerIds
from jobyard.dispatcher.engines import NewJob, Submission
from jobyard.dispatcher.flow import FlowDispatch
from jobyard.dispatcher.models import DispatchRequest, JobHandle, JobStatus
from jobyard.dispatcher.routing import Router, record_dispatch
from jobyard.dispatcher.submission import submission_of
from jobyard.dispatcher.upstream import check_upstream
from jobyard.job_engine import JobyardError, get_spec, registry
from jobyard.job_engine.collector import collector_paused
from jobyard.job_engine.ids import new_job_ids
from jobyard.job_engine.lifecycle import dispatched_batch_event

#: Jobs `dispatch_many` validates at a time, while Dramatiq sends the ones before.
PLAIN_CHUNK = 500


class BulkDispatch:
    def __init__(
        self,
        router: Router,
        caller_ids: CallerIds,
        flow: FlowDispatch,
        status: Callable[[str], JobStatus] | None = None,
    ) -> None:
        """`status`: how an `after=` id is looked up (the dispatcher's; default the router's)."""
        self.status = status or router.status
        self.router = router
        self.caller_ids = caller_ids
        self.flow = flow

    def dispatch_many(
        self, requests: Iterable[DispatchRequest | tuple[str, Any]]
    ) -> list[JobHandle | Exception]:
        """One result per request, in order: its handle, or the error `dispatch` would have
        raised for it (the other jobs are dispatched all the same)."""
        started = time.time()
        listed = list(requests)
        results: list[JobHandle | Exception | None] = [None] * len(listed)
        plain: list[int] = []
        others: list[int] = []
        limited = registry.limited_names()
        for index, request in enumerate(listed):
            plain_one = _is_plain(request) and _name(request) not in limited
            (plain if plain_one else others).append(index)
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
        outcomes = self.router.route_many(((job, False) for job in jobs), streamed=True)
        # The jobs Dramatiq took, each name's in one job log entry (they all carry their
        # payload's JSON text); the rest (Temporal's) one by one, as `dispatch` records them.
        preferred = self.router.dramatiq.name
        taken: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
        for (index, job), outcome in zip(order, outcomes, strict=True):
            results[index] = outcome
            if (
                isinstance(outcome, JobHandle)
                and outcome.engine == preferred
                and not outcome.duplicate
                and outcome.fallback_reason is None
                and job.payload_json is not None
            ):
                taken.setdefault((job.name, job.queue), []).append((job.job_id, job.payload_json))
            elif isinstance(outcome, JobHandle):
                record_dispatch(job.submission(), outcome, started)
        for (name, queue), queued in taken.items():
            dispatched_batch_event(name, queue, preferred, queued, started)

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
            given = requests[index]
            request = DispatchRequest(*given) if isinstance(given, tuple) else given
            try:
                job = submission_of(request)
                check_upstream(job.options.after, self.status)
            except (JobyardError, ValueError) as exc:
                results[index] = exc
                continue
            (generated if request.job_id is None else chosen).append((index, job))
        for index, job in generated:
            try:
                get_spec(job.name).check_environment()
            except JobyardError as exc:
                results[index] = exc
        generated = self._flow(generated, results)
        chosen = self._flow(chosen, results)
        ready = [(index, job, False) for index, job in generated if results[index] is None]
        ready += self.caller_ids.claim_many(chosen, results)
        outcomes = self.router.route_many([(job, registered) for _, job, registered in ready])
        for (index, _, _), outcome in zip(ready, outcomes, strict=True):
            results[index] = outcome
        for index, job in (*generated, *chosen):
            result = results[index]
            if isinstance(result, JobHandle):
                record_dispatch(job, result, started)

    def _flow(
        self, jobs: list[tuple[int, Submission]], results: list[JobHandle | Exception | None]
    ) -> list[tuple[int, Submission]]:
        """Limited jobs through flow control (`FlowDispatch.prepare`): a collapsed one's result
        is its handle, and it is dispatched no further."""
        kept: list[tuple[int, Submission]] = []
        for index, job in jobs:
            spec = get_spec(job.name)
            if results[index] is not None or not spec.limited:
                kept.append((index, job))
                continue
            try:
                prepared = self.flow.prepare(job, spec)
            except (JobyardError, ValueError) as exc:
                results[index] = exc
                continue
            if isinstance(prepared, JobHandle):
                results[index] = prepared
            else:
                kept.append((index, prepared))
        return kept


def _name(request: DispatchRequest | tuple[str, Any]) -> Any:
    return request[0] if type(request) is tuple else getattr(request, "name", None)


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
        and request.priority is None
        and request.after is None
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
    job_name, queue, priority = spec.name, spec.queue, spec.priority
    for index, outcome in zip(members, encoded, strict=True):
        if isinstance(outcome, JobyardError):
            results[index] = outcome
        elif missing is not None:
            results[index] = missing
        else:
            yield (
                index,
                NewJob(job_ids.pop(), job_name, queue, outcome.data, outcome.text, priority),
            )


def _settled(result: JobHandle | Exception | None) -> JobHandle | Exception:
    if result is None:
        raise AssertionError("dispatch_many left a job without a result")
    return result

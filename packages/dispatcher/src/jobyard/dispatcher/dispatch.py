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
import functools
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from jobyard.dispatcher.breaker import CircuitBreaker
from jobyard.dispatcher.dramatiq_engine import DramatiqEngine
from jobyard.dispatcher.errors import DispatchUnavailableError, EngineUnavailable, JobNotFoundError
from jobyard.dispatcher.models import (
    CLAIM_BEST_EFFORT,
    CLAIM_NONE,
    CLAIM_STRICT,
    FALLBACK_FLAG_OFF,
    FALLBACK_NO_WORKERS,
    FALLBACK_OWNED_BY_TEMPORAL,
    FALLBACK_REDIS_ERROR,
    FALLBACK_REDIS_UNHEALTHY,
    DispatchOptions,
    JobHandle,
    JobStatus,
)
from jobyard.dispatcher.temporal_engine import TemporalEngine
from jobyard.job_engine import JobSpec, RetryPolicy, env, get_spec
from jobyard.job_engine.lifecycle import dispatched_event
from jobyard.job_engine.registry import load_job_modules
from jobyard.queue.client import get_client
from jobyard.queue.store import JobStore

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}")
MAX_DELAY_SECONDS = 7 * 24 * 3600  # Dramatiq's delay limit; Temporal would allow more


def _check_job_id(job_id: str | None) -> str:
    if job_id is None:
        return uuid.uuid4().hex
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
    return url


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
    def __init__(self, dramatiq: DramatiqEngine, temporal: TemporalEngine, breaker: CircuitBreaker):
        self.dramatiq = dramatiq
        self.temporal = temporal
        self.breaker = breaker

    @classmethod
    def from_env(cls) -> Dispatcher:
        client = get_client()
        store = JobStore(client)
        timeout_ms = int(env.get_float(env.WORKER_HEARTBEAT_TIMEOUT) * 1000)
        temporal = TemporalEngine(
            env.get_str(env.TEMPORAL_ADDRESS),
            env.get_str(env.TEMPORAL_NAMESPACE),
            env.get_str(env.TEMPORAL_TASK_QUEUE),
            env.get_float(env.TEMPORAL_START_TIMEOUT),
        )
        temporal.warm_up()
        breaker = CircuitBreaker(client.ping, env.get_float(env.BREAKER_PROBE_INTERVAL))
        return cls(DramatiqEngine(store, timeout_ms), temporal, breaker)

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
        spec = get_spec(name)
        data = spec.encode(payload)
        spec.check_environment()
        job_id = _check_job_id(job_id)
        options = DispatchOptions(
            delay=_check_delay(delay),
            webhook_url=_check_webhook_url(webhook_url),
            retry=_check_retry(retry),
        )
        started = time.time()
        handle = self._route(spec, job_id, data, options)
        if not handle.duplicate:
            dispatched_event(
                job_id, spec.name, spec.queue, handle.engine, data, handle.fallback_reason, started
            )
        return handle

    def _route(
        self,
        spec: JobSpec,
        job_id: str,
        data: dict[str, Any],
        options: DispatchOptions,
    ) -> JobHandle:
        to_temporal = functools.partial(self._to_temporal, spec, job_id, data, options)
        if not env.get_bool(env.USE_DRAMATIQ):
            return self._flag_off(spec, job_id, to_temporal)
        if self.breaker.is_open:
            return to_temporal(FALLBACK_REDIS_UNHEALTHY, CLAIM_BEST_EFFORT)
        try:
            outcome = self.dramatiq.submit(spec, job_id, data, options)
        except EngineUnavailable as exc:
            self.breaker.trip(exc.reason)
            claim = CLAIM_STRICT if exc.ambiguous else CLAIM_BEST_EFFORT
            return to_temporal(FALLBACK_REDIS_ERROR, claim)
        if outcome.status == "enqueued":
            return JobHandle(job_id, "dramatiq")
        if outcome.status == "exists" and outcome.engine == "dramatiq":
            return JobHandle(job_id, "dramatiq", duplicate=True)
        reason = (
            FALLBACK_NO_WORKERS if outcome.status == "no_workers" else FALLBACK_OWNED_BY_TEMPORAL
        )
        return to_temporal(reason, CLAIM_NONE)

    def _flag_off(
        self, spec: JobSpec, job_id: str, to_temporal: Callable[[str, str], JobHandle]
    ) -> JobHandle:
        """Claim the job for Temporal here when Redis answers: cheaper than the workflow's claim."""
        claim = CLAIM_BEST_EFFORT
        if not self.breaker.is_open:
            try:
                reply = self.dramatiq.handoff(job_id, spec.name, spec.queue)
            except EngineUnavailable as exc:
                self.breaker.trip(exc.reason)
            else:
                if reply[0] != "claimed":  # dispatched to Dramatiq before the flag was turned off
                    return JobHandle(job_id, "dramatiq", duplicate=True)
                claim = CLAIM_NONE
        return to_temporal(FALLBACK_FLAG_OFF, claim)

    def _to_temporal(
        self,
        spec: JobSpec,
        job_id: str,
        payload: dict[str, Any],
        options: DispatchOptions,
        reason: str,
        claim: str,
    ) -> JobHandle:
        request = {
            "job_id": job_id,
            "name": spec.name,
            "queue": spec.queue,
            "payload": payload,
            "claim": claim,
            "fallback_reason": reason,
            "webhook_url": options.webhook_url,
            "retry": options.retry,
        }
        try:
            started = self.temporal.start(request, options.delay)
        except EngineUnavailable as exc:
            raise DispatchUnavailableError(
                f"job {spec.name!r} ({job_id}) was not started: Dramatiq skipped ({reason}) and "
                f"{exc}. Retry the dispatch with the same job_id."
            ) from None
        return JobHandle(job_id, "temporal", fallback_reason=reason, duplicate=not started)

    def status(self, job_id: str) -> JobStatus:
        if not self.breaker.is_open:
            try:
                found = self.dramatiq.status(job_id)
            except EngineUnavailable as exc:
                self.breaker.trip(exc.reason)
            else:
                if found is not None:
                    return found
        found = self.temporal.status(job_id)
        if found is None:
            raise JobNotFoundError(job_id)
        return found


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
    return get_dispatcher().dispatch(
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


def get_job(job_id: str) -> JobStatus:
    """The job's engine, state, attempts and result or error, whichever engine ran it."""
    return get_dispatcher().status(job_id)


async def aget_job(job_id: str) -> JobStatus:
    return await asyncio.to_thread(get_job, job_id)

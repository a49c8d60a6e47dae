"""In-process: each job runs to its end inside `submit`, in a thread of its own. For tests and
`jobyard run`; it shows what a third engine needs: this module, and nothing else changed."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from jobyard.dispatcher.engines.base import (
    Cancellation,
    CancelStatus,
    Engine,
    QueueDepth,
    Release,
    ReleaseStatus,
    Replay,
    ReplayStatus,
    Submission,
    SubmitStatus,
    Submitted,
    WorkerInfo,
)
from jobyard.dispatcher.engines.inline.errors import failure_of
from jobyard.dispatcher.models import EngineName, JobStatus
from jobyard.job_engine import get_spec
from jobyard.job_engine.inline import InlineContext
from jobyard.job_engine.states import JobState

_REPLAYABLE = (JobState.FAILED, JobState.DEAD, JobState.CANCELLED)


@dataclass
class _Run:
    job: Submission
    state: JobState = JobState.QUEUED
    attempts: int = 0
    result: Any = None
    error: str | None = None
    steps: dict[str, Any] = field(default_factory=dict)
    progress: Any = None


class InlineEngine(Engine):
    name: ClassVar[EngineName] = "inline"

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        # A thread of its own, so a caller inside an event loop can submit too.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobyard-inline")

    def submit(self, job: Submission) -> Submitted:
        with self._lock:
            if job.job_id in self._runs:
                return Submitted(SubmitStatus.DUPLICATE, owner=self.name)
            run = self._runs[job.job_id] = _Run(job)
        self._pool.submit(self._run, run).result()
        return Submitted(SubmitStatus.STARTED)

    def _run(self, run: _Run) -> None:
        spec = get_spec(run.job.name)
        ctx = InlineContext(spec, run.job.job_id)
        run.state = JobState.RUNNING
        try:
            run.result = asyncio.run(
                asyncio.wait_for(
                    spec.handler(ctx, spec.validate(run.job.payload)), spec.effective_timeout()
                )
            )
            run.state, run.error = JobState.SUCCEEDED, None
        except Exception as exc:
            run.state, run.error = failure_of(exc)
        run.attempts = ctx.attempt
        run.steps = dict(ctx.steps)
        run.progress = ctx.progress_values[-1] if ctx.progress_values else None

    def release(self, job_id: str, name: str, queue: str) -> Release:
        run = self._runs.get(job_id)
        if run is None:
            return Release(ReleaseStatus.RELEASED)
        return Release(ReleaseStatus.KEPT, run.state)

    def status(self, job_id: str) -> JobStatus | None:
        run = self._runs.get(job_id)
        if run is None:
            return None
        return JobStatus(
            job_id=job_id,
            engine=self.name,
            state=run.state,
            attempts=run.attempts,
            name=run.job.name,
            result=run.result if run.state == JobState.SUCCEEDED else None,
            error=run.error,
            progress=run.progress,
        )

    def cancel(self, job_id: str) -> Cancellation:
        run = self._runs.get(job_id)
        if run is None:
            return Cancellation(CancelStatus.NOT_HERE)
        return Cancellation(CancelStatus.FINISHED, run.state)  # submit returns when it ends

    def replay(self, job_id: str, payload: Any = None) -> Replay:
        run = self._runs.get(job_id)
        if run is None:
            return Replay(ReplayStatus.NOT_HERE)
        job = run.job
        if run.state not in _REPLAYABLE:
            return Replay(ReplayStatus.ACTIVE, run.state, job.name, job.queue)
        self._pool.submit(self._run, run).result()
        return Replay(ReplayStatus.REPLAYED, run.state, job.name, job.queue, job.payload)

    def steps(self, job_id: str) -> dict[str, Any]:
        run = self._runs.get(job_id)
        return dict(run.steps) if run is not None else {}

    def queue_depths(self) -> list[QueueDepth]:
        return []

    def workers(self) -> list[WorkerInfo]:
        return []

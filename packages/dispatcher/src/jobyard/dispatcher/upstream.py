"""`dispatch_job(..., after=[job_id, ...])`: the ids must name jobs that exist when it is
dispatched (so no cycle can form). The waiting itself happens where the job runs, on either
engine, before its handler (`BaseJobContext.wait_upstream`, jobyard.job_engine.waits).

The dependency is also kept in the step journal (`job_steps`, row AFTER_RECORD) once the job
is dispatched, the one place both engines' jobs are read from: `GET /jobs/{id}` and the
dashboard show a job's upstream jobs whichever engine runs it, waiting or done, and a job
Redis lost is dispatched again still waiting for them (the rescue's `recover_lost`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from jobyard.dispatcher.errors import JobNotFoundError, UnknownUpstreamError
from jobyard.job_engine import crypto
from jobyard.job_engine.db import joblog
from jobyard.job_engine.db.steps import begin_step

log = logging.getLogger("jobyard.upstream")

#: The journal row of a job dispatched `after=` others: DispatchOptions.after ({"ids": [...],
#: "on_failure": ...}). Its name cannot be a step's: ctx.run refuses names beginning "__".
AFTER_RECORD = "__after__"


def check_upstream(after: dict[str, Any] | None, status: Callable[[str], Any]) -> None:
    """UnknownUpstreamError for the first id `status` (the dispatcher's lookup on both engines
    and the job log) does not find."""
    if not after:
        return
    if not joblog.enabled():  # where the job learns how the others ended
        raise ValueError("after= needs the job log (JOBYARD_JOB_LOG=true and a DATABASE_URL)")
    for job_id in after["ids"]:
        try:
            status(job_id)
        except JobNotFoundError:
            raise UnknownUpstreamError(job_id) from None


def record_upstream(jobs: list[tuple[str, dict[str, Any]]]) -> None:
    """Keep each dispatched (job id, `after`) (AFTER_RECORD), in one group commit. Not kept (the
    database away since the ids were checked): the job still waits for them; only the listing
    and a recovery from the job log lack them (logged)."""
    try:
        waits = [
            begin_step(job_id, AFTER_RECORD, crypto.seal_json(job_id, json.dumps(after)))
            for job_id, after in jobs
        ]
        kept = all([wait() for wait in waits])
    except Exception as exc:  # the journal never fails a dispatch that was accepted
        log.warning("upstream ids of %d job(s) were not kept: %s", len(jobs), exc)
        return
    if not kept:
        log.warning("upstream ids of %d job(s) were not kept (the database is away)", len(jobs))


def recorded_after(job_id: str, steps: dict[str, str]) -> dict[str, Any] | None:
    """The `after` kept for the job among its journalled `steps` (JSON text, as kept), if any."""
    text = steps.get(AFTER_RECORD)
    if text is None:
        return None
    after: dict[str, Any] = json.loads(crypto.unseal_json(job_id, text))
    return after

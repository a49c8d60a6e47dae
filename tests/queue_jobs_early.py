"""A job module whose job uses a queue declared by a module loaded after it
(JOBYARD_JOB_MODULES=tests.queue_jobs_early,tests.queue_jobs): `@job` finds it by loading the
other job modules, so the order of JOBYARD_JOB_MODULES does not matter."""

from __future__ import annotations

from pydantic import BaseModel

from jobyard.job_engine import JobContext, job


class Empty(BaseModel):
    pass


@job("test.ai_early", queue="ai", payload=Empty)
async def ai_early(ctx: JobContext, payload: Empty) -> str:
    return "early"

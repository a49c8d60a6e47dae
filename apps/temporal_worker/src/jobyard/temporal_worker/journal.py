"""Returned steps of Temporal jobs in the job log's `job_steps`, as Dramatiq's are
(jobyard.job_engine.db.steps).

Temporal records a step's result when the worker's completion reaches the server. A step that
returned while the server was down (SIGKILLed, restarting, partitioned away) or whose worker died
right after it returned is, for Temporal, a step that never finished: it runs it again. So the
step activity writes the result here before returning it, and reads here before running a step:
a result found is returned without running the function again."""

from __future__ import annotations

from jobyard.job_engine import crypto, env
from jobyard.job_engine.db.steps import begin_step, load_steps


class StepRecords:
    """The step journal of the process's database (DATABASE_URL)."""

    @classmethod
    def from_env(cls) -> StepRecords | None:
        """None when the job log or its step journal is switched off (JOBYARD_JOB_LOG,
        JOBYARD_STEP_JOURNAL)."""
        if env.get_bool(env.JOB_LOG) and env.get_bool(env.STEP_JOURNAL):
            return cls()
        return None

    def recorded(self, job_id: str, step: str) -> str | None:
        """The step's result as JSON text, if it returned before; raises if the database
        cannot be read."""
        kept = load_steps([job_id]).get(job_id, {}).get(step)
        return None if kept is None else crypto.unseal_json(job_id, kept)

    def record(self, job_id: str, step: str, result_json: str) -> bool:
        """Keeps a returned step's result (waits for the commit); False (logged once by the
        journal) when the database cannot take it: the step has returned, so it does not fail
        for that."""
        return begin_step(job_id, step, result_json)()

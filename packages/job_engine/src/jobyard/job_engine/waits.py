"""Jobs that wait for other jobs to end (`ctx.child`, `ctx.children`), engine-neutrally.

A waiting job holds no worker: each engine parks it (Dramatiq: a delayed message, as a long
`ctx.sleep`; Temporal: a workflow timer) and looks again, here, at the job log, the one place
that knows every job's ending whichever engine ran it. The looks start fast and thin out as the
wait grows (`next_look`). Once every job has ended, their outcomes are recorded as the wait's
step: from then on a resumed, retried or replayed parent reads the same outcomes, so it goes
past the wait exactly once with the same results.
"""

from __future__ import annotations

from typing import Any

from jobyard.job_engine import env
from jobyard.job_engine.db.outcomes import count_ended, ended_outcomes

#: Seconds before the first look: a child of a few steps has usually ended by then.
FIRST_LOOK = 0.25
#: A look waits this fraction of the time waited so far (capped by JOBYARD_WAIT_POLL_MAX).
LOOK_FRACTION = 0.1


def next_look(waited: float) -> float:
    """Seconds until the next look, for a wait that began `waited` seconds ago."""
    return min(env.get_float(env.WAIT_POLL_MAX), max(FIRST_LOOK, waited * LOOK_FRACTION))


def outcomes_once_ended(job_ids: list[str]) -> list[dict[str, Any]] | None:
    """Each job's outcome ({"job_id", "state", "result", "error"}), in the order given, once
    every one has ended; None while any has not. A look while some run is one COUNT; the rows
    are read once, when the count is complete."""
    distinct = list(dict.fromkeys(job_ids))
    if count_ended(distinct) < len(distinct):
        return None
    found = ended_outcomes(distinct)
    if len(found) < len(distinct):  # one was replayed between the two reads: still running
        return None
    return [found[job_id] for job_id in job_ids]

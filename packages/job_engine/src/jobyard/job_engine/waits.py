"""Jobs that wait for other jobs to end (`ctx.child`, `ctx.children`), engine-neutrally.

A waiting job holds no worker: each engine parks it (Dramatiq: a delayed message, as a long
`ctx.sleep`; Temporal: a workflow timer) and looks again, here, at the job log, the one place
that knows every job's ending whichever engine ran it. The looks start fast and thin out as the
wait grows (`next_look`). Once every job has ended, their outcomes are recorded as the wait's
step: from then on a resumed, retried or replayed parent reads the same outcomes, so it goes
past the wait exactly once with the same results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jobyard.job_engine import env
from jobyard.job_engine.states import JobState

#: Seconds before the first look: a child of a few steps has usually ended by then.
FIRST_LOOK = 0.25
#: A look waits this fraction of the time waited so far (capped by JOBYARD_WAIT_POLL_MAX).
LOOK_FRACTION = 0.1


#: How a waiting job's display_state begins ("waiting for 3 children", "waiting for
#: payment.confirmed"): the API keeps such a state as the engine gave it.
WAITING_FOR = "waiting for "


@dataclass(frozen=True)
class Waiting:
    """What a waiting job's status shows (as a flow-control Hold does for a held one)."""

    display_state: str
    waiting_reason: str


def is_waiting(display_state: Any, state: str) -> bool:
    """Whether a job's display_state is a wait's ("waiting for ..."), which it shows while
    running."""
    return (
        state == JobState.RUNNING
        and isinstance(display_state, str)
        and display_state.startswith(WAITING_FOR)
    )


def _listed(job_ids: list[str]) -> str:
    shown = ", ".join(job_ids[:3])
    return shown + (f" and {len(job_ids) - 3} more" if len(job_ids) > 3 else "")


def waiting_for_children(job_ids: list[str]) -> Waiting:
    noun = "child" if len(job_ids) == 1 else "children"
    return Waiting(f"{WAITING_FOR}{len(job_ids)} {noun}", f"children {_listed(job_ids)}")


def waiting_for_upstream(job_ids: list[str]) -> Waiting:
    noun = "job" if len(job_ids) == 1 else "jobs"
    return Waiting(f"{WAITING_FOR}{len(job_ids)} {noun}", f"dispatched after {_listed(job_ids)}")


def waiting_for_event(name: str, match: dict[str, Any], timeout: float | None) -> Waiting:
    reason = f"event {name}" + (f" matching {json.dumps(match, sort_keys=True)}" if match else "")
    if timeout is not None:
        reason += f" (for up to {timeout:g}s)"
    return Waiting(f"{WAITING_FOR}{name}", reason)


def next_look(waited: float) -> float:
    """Seconds until the next look, for a wait that began `waited` seconds ago."""
    return min(env.get_float(env.WAIT_POLL_MAX), max(FIRST_LOOK, waited * LOOK_FRACTION))


def outcomes_once_ended(job_ids: list[str]) -> list[dict[str, Any]] | None:
    """Each job's outcome ({"job_id", "state", "result", "error"}), in the order given, once
    every one has ended; None while any has not. A look while some run is one COUNT; the rows
    are read once, when the count is complete."""
    from jobyard.job_engine.db.outcomes import count_ended, ended_outcomes  # the database's

    distinct = list(dict.fromkeys(job_ids))
    if count_ended(distinct) < len(distinct):
        return None
    found = ended_outcomes(distinct)
    if len(found) < len(distinct):  # one was replayed between the two reads: still running
        return None
    return [found[job_id] for job_id in job_ids]

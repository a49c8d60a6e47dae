"""A job's related jobs, whichever engine ran it: the children it started (`ctx.child`,
`ctx.children`: each call's start step records how many and their keys, from which their ids
are derived again) and the jobs it was dispatched `after` (kept in the step journal at dispatch,
upstream.AFTER_RECORD).

The steps are the engine's (Redis, for a Dramatiq job) or else the step journal (`job_steps`,
both engines), so a Temporal job and a Dramatiq job whose Redis records expired show theirs too.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from jobyard.dispatcher.upstream import AFTER_RECORD
from jobyard.job_engine.children import START_SUFFIX, child_ids
from jobyard.job_engine.context import CHILDREN_STEP_PREFIX
from jobyard.job_engine.db.steps import recall_steps

__all__ = ["MAX_LISTED", "journal_of", "related_jobs", "started_children", "upstream_of"]

log = logging.getLogger("jobyard.relations")

#: Most children listed for one job (a fan-out may have 10,000); `children_count` has them all.
MAX_LISTED = 1000


def journal_of(job_id: str) -> dict[str, Any]:
    """The job's journalled steps, decoded ({} when the journal cannot be read: the relations
    are then missing, nothing else)."""
    try:
        return {step: json.loads(text) for step, text in recall_steps(job_id).items()}
    except Exception:  # the database away, a key removed
        log.warning("steps of job %s unreadable from the journal", job_id, exc_info=True)
        return {}


def started_children(job_id: str, steps: dict[str, Any]) -> dict[str, list[str]]:
    """start step name -> the ids of the children that step started, in order."""
    found = {}
    for step, record in steps.items():
        if not (step.startswith(CHILDREN_STEP_PREFIX) and step.endswith(START_SUFFIX)):
            continue
        fan_in = step[len(CHILDREN_STEP_PREFIX) : -len(START_SUFFIX)]
        if fan_in.isdigit() and isinstance(record, dict) and "count" in record:
            found[step] = child_ids(job_id, int(fan_in), record)
    return found


def upstream_of(journal: dict[str, Any]) -> list[str]:
    """The ids the job was dispatched after, from its journal (`journal_of`)."""
    after = journal.get(AFTER_RECORD)
    return list(after["ids"]) if isinstance(after, dict) else []


def related_jobs(job_id: str, steps: dict[str, Any]) -> dict[str, Any]:
    """{"children": ids (at most MAX_LISTED), "children_count", "upstream": ids}, from the
    engine's `steps` or, without them, the journal."""
    journal = journal_of(job_id)
    started = started_children(job_id, steps or journal)
    children = [child for step in sorted(started, key=_order) for child in started[step]]
    return {
        "children": children[:MAX_LISTED],
        "children_count": len(children),
        "upstream": upstream_of(journal),
    }


def _order(step: str) -> int:
    return int(step[len(CHILDREN_STEP_PREFIX) : -len(START_SUFFIX)])

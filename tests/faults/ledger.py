"""Counting from the append-only ledger the fault jobs write (see tests/faults/jobs.py).

A job counts as **ran on both engines** (a true double run, rule 2) when steps of it executed
on Dramatiq and on Temporal and the second engine's executions are not a clean *handoff*. A
clean handoff is the move rule 5 asks for (the rescue moving a started job, with its recorded
steps, off a Dramatiq whose workers all died), and it reads in the ledger as:

1. every Dramatiq execution starts before the first Temporal execution (the job never goes back);
2. every Dramatiq execution either ended (END or FAIL) before the first Temporal START, or never
   ended because its process is dead (killed mid-step): no Dramatiq execution was still alive
   while Temporal ran the job;
3. no step that returned on Dramatiq starts again on Temporal (its recorded result went along);
   a step interrupted on Dramatiq may run again on Temporal, at least once, as rule 3 allows.

Anything else on two engines is a double run: two engines running the job at once, a job that
went back, or one that ran again from the top on the other engine.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Execution:
    """One execution of one step: its START line and, if the function returned, its END line."""

    engine: str
    pid: int
    started: float
    ended: float | None = None
    failed: bool = False  # it ended by raising: a retry of it is no re-run of a returned step


@dataclass
class StepHistory:
    executions: list[Execution] = field(default_factory=list)
    #: starts that came after an END of this step: it ran again after its function returned
    after_return: int = 0
    #: starts that came while no execution had returned yet (after a crash, a requeue, a race,
    #: or a retry of an execution that raised)
    after_interruption: int = 0


@dataclass
class Counts:
    jobs_started: int
    both_engines: int  # true double runs (see the module docstring)
    rerun_returned: int
    rerun_interrupted: int
    handed_over: int = 0  # on both engines by a clean handoff: not a double run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now has the id: ours is gone
        return False
    return True


def clean_handoff(steps: dict[str, StepHistory]) -> bool:
    """Whether a job's executions on Dramatiq then Temporal are the rescue's handoff (see the
    module docstring), not a double run."""
    executions = [e for h in steps.values() for e in h.executions]
    first_temporal = min((e.started for e in executions if e.engine == "temporal"), default=None)
    if first_temporal is None:
        return False
    for history in steps.values():
        returned_on_dramatiq = False
        for e in history.executions:
            if e.engine == "dramatiq":
                if e.started > first_temporal:
                    return False  # went back to Dramatiq
                if e.ended is None and _alive(e.pid):
                    return False  # may still be running beside Temporal
                if e.ended is not None and e.ended > first_temporal:
                    return False  # was running beside Temporal
                returned_on_dramatiq |= e.ended is not None and not e.failed
            elif e.engine == "temporal" and returned_on_dramatiq:
                return False  # a returned step ran again on the new engine
    return True


def fold(
    lines: list[dict[str, Any]],
    out: dict[str, dict[str, StepHistory]],
    open_by_pid: dict[tuple[str, str, int], Execution],
) -> None:
    """Add ledger lines, in the order they were appended, to `out` (tag -> step -> history);
    `open_by_pid` holds the executions still without an END, for the next lines."""
    for line in lines:
        key = (line["tag"], line["step"], line["pid"])
        history = out[line["tag"]][line["step"]]
        if line["ev"] == "START":
            if history.executions:
                if any(e.ended is not None and not e.failed for e in history.executions):
                    history.after_return += 1
                else:
                    history.after_interruption += 1
            execution = Execution(line["engine"], line["pid"], line["t"])
            history.executions.append(execution)
            open_by_pid[key] = execution
        elif key in open_by_pid:
            execution = open_by_pid.pop(key)
            execution.ended = line["t"]
            execution.failed = line["ev"] == "FAIL"


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.touch()

    def lines(self) -> list[dict[str, Any]]:
        text = self.path.read_text()
        # A writer killed mid-write can leave a partial last line; it is not an execution.
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def histories(self) -> dict[str, dict[str, StepHistory]]:
        """tag -> step -> history, in the order the lines were appended."""
        out: dict[str, dict[str, StepHistory]] = defaultdict(lambda: defaultdict(StepHistory))
        fold(self.lines(), out, {})
        return out

    def engines(self, tag: str) -> set[str]:
        steps = self.histories().get(tag, {})
        return {e.engine for h in steps.values() for e in h.executions}

    def started_tags(self) -> set[str]:
        return set(self.histories())

    def counts(self, tags: set[str] | None = None) -> Counts:
        histories = self.histories()
        selected = {t: h for t, h in histories.items() if tags is None or t in tags}
        on_both = [
            steps
            for steps in selected.values()
            if len({e.engine for h in steps.values() for e in h.executions}) > 1
        ]
        handed_over = sum(1 for steps in on_both if clean_handoff(steps))
        returned = sum(h.after_return for steps in selected.values() for h in steps.values())
        interrupted = sum(
            h.after_interruption for steps in selected.values() for h in steps.values()
        )
        return Counts(len(selected), len(on_both) - handed_over, returned, interrupted, handed_over)

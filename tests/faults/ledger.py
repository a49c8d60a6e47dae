"""Counting from the append-only ledger the fault jobs write (see tests/faults/jobs.py)."""

from __future__ import annotations

import json
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
    both_engines: int
    rerun_returned: int
    rerun_interrupted: int


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
        open_by_pid: dict[tuple[str, str, int], Execution] = {}
        for line in self.lines():
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
        return out

    def engines(self, tag: str) -> set[str]:
        steps = self.histories().get(tag, {})
        return {e.engine for h in steps.values() for e in h.executions}

    def started_tags(self) -> set[str]:
        return set(self.histories())

    def counts(self, tags: set[str] | None = None) -> Counts:
        histories = self.histories()
        selected = {t: h for t, h in histories.items() if tags is None or t in tags}
        both = sum(
            1
            for steps in selected.values()
            if len({e.engine for h in steps.values() for e in h.executions}) > 1
        )
        returned = sum(h.after_return for steps in selected.values() for h in steps.values())
        interrupted = sum(
            h.after_interruption for steps in selected.values() for h in steps.values()
        )
        return Counts(len(selected), both, returned, interrupted)

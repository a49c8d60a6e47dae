"""apps/temporal_worker reaches Dramatiq's package in one place only (issue 28, item 1): the
claim's store (claims.py); and no activity fetches a whole Dispatcher for a claim."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

PACKAGE = ROOT / "apps/temporal_worker/src/jobyard/temporal_worker"
ALLOWED = {
    "claims.py": {"jobyard.queue.client", "jobyard.queue.store"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_only_the_claim_store_and_the_retry_policy_come_from_jobyard_queue() -> None:
    found = {
        path.name: {
            m for m in _imports(path) if m == "jobyard.queue" or m.startswith("jobyard.queue.")
        }
        for path in sorted(PACKAGE.glob("*.py"))
    }
    assert {name: mods for name, mods in found.items() if mods} == ALLOWED


def test_activities_get_no_dispatcher() -> None:
    """The activities take the workflow's contract from the dispatcher package, nothing else."""
    source = (PACKAGE / "activities.py").read_text()
    assert "get_dispatcher" not in source
    dispatcher = {
        m for m in _imports(PACKAGE / "activities.py") if m.startswith("jobyard.dispatcher")
    }
    assert dispatcher == {"jobyard.dispatcher.engines.temporal"}

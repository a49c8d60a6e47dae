"""The rescue loop's flow-control upkeep (`jobyard temporal-worker`, each rescue interval):
delete the permits that ran out, and wake the workflows waiting for a concurrency slot that
came free without a release (its holder's lease expired: a worker died, a workflow was
terminated), one key at a time in turn (PermitStore.due_round_robin), so a key with one waiting
job is woken within one turn of every waiting key, whatever another key's backlog.

A process whose jobs declare no limit does nothing here (and never loads the permit store)."""

from __future__ import annotations

import asyncio

from temporalio.client import Client

from jobyard.dispatcher.engines.temporal.engine import wake_workflows
from jobyard.job_engine.flow.declarations import Concurrency
from jobyard.job_engine.flow.limiter import CONCURRENCY
from jobyard.job_engine.registry import registry

#: Waiters woken per concurrency limit per pass, at most.
WAKE_BUDGET = 100


def concurrency_scopes() -> dict[str, int]:
    """Every declared concurrency limit (a job's or a queue's): its scope and limit."""
    return {
        limit.scope: limit.declaration.limit
        for spec in registry
        for limit in spec.limits
        if limit.kind == CONCURRENCY and isinstance(limit.declaration, Concurrency)
    }


class FlowSweep:
    def __init__(self, client: Client) -> None:
        self.client = client
        self._last: dict[str, str | None] = {}  # per scope, the last key served

    async def run_once(self) -> int:
        """One pass; how many waiting workflows it woke."""
        if not any(spec.limited for spec in registry):
            return 0
        from jobyard.job_engine.flow import runtime  # loads the database driver

        store = runtime.permit_store()
        await asyncio.to_thread(store.purge)
        woken = 0
        for scope, limit in concurrency_scopes().items():
            due = await asyncio.to_thread(
                store.due_round_robin, scope, limit, WAKE_BUDGET, self._last.get(scope)
            )
            if due:
                self._last[scope] = due[-1][0]
                woken += await wake_workflows(self.client, [holder for _, holder in due])
        return woken

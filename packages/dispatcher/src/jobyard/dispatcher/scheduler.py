"""The scheduler: fires declared schedules (`jobyard.job_engine.schedule`) exactly once per tick.

Every `jobyard worker` and `jobyard temporal-worker` runs one in a thread (`JOBYARD_SCHEDULER=false`
turns it off), and `jobyard scheduler` runs one alone. They need no leader: they coordinate
through two tables of the SQL database jobyard already has, not through Redis, so schedules keep
firing while Redis is down (their jobs then go to Temporal).

* `schedule_state.cursor`: every tick up to the cursor has been claimed or skipped. A pass reads
  the ticks due after it and moves it with a compare-and-set (`UPDATE ... WHERE cursor = old`),
  in the same transaction that inserts those ticks into `schedule_ticks`. Two schedulers that
  race: one update matches, the other's matches nothing and it rolls back.
* `schedule_ticks`: one row per claimed tick, keyed by the tick's job id, which is derived from
  the schedule's name and the tick time. The claimant dispatches it with that job id and marks
  it dispatched. If it dies in between, the row's lease (`JOBYARD_SCHEDULER_LEASE`) runs out
  and another scheduler takes it over: it asks the engines whether the job id exists and
  dispatches only if not (the dispatcher's idempotency covers the rest).

So a tick starts one job, however many schedulers run, and a scheduler killed mid-tick delays
that tick by at most the lease. Skipped ticks (overlap, catch-up) are counted in the state row
and in `jobyard_schedule_fires_total`.

This module is the scheduler's public face; its pieces are in `jobyard.dispatcher.scheduling`:
the Scheduler and its pass (`passes`), claiming ticks (`claims`), one tick from lease to
dispatch (`ticks`), lags and pruning (`housekeeping`), the operations of the CLI and the admin
API (`operations`), and the thread that runs it (`runner`).
"""

from __future__ import annotations

from jobyard.dispatcher.scheduling.engines import Dispatch, Status
from jobyard.dispatcher.scheduling.operations import (
    backfill_schedule,
    list_schedules,
    pause_schedule,
    resume_schedule,
    trigger_schedule,
)
from jobyard.dispatcher.scheduling.passes import Scheduler
from jobyard.dispatcher.scheduling.runner import run_forever, start_scheduler_thread

__all__ = [
    "Dispatch",
    "Scheduler",
    "Status",
    "backfill_schedule",
    "list_schedules",
    "pause_schedule",
    "resume_schedule",
    "run_forever",
    "start_scheduler_thread",
    "trigger_schedule",
]

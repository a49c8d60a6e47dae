"""The scheduler's pieces (`jobyard.dispatcher.scheduler` is their public face and tells the
design): `passes` (the Scheduler and its pass), `claims` (ticks claimed into schedule_ticks),
`ticks` (one claimed tick, from its lease to its dispatch), `housekeeping` (tick lags, pruning),
`operations` (list, pause, resume, trigger, backfill), `runner` (the thread and its loop),
`rows` and `engines` (what they share: tick-row states, the engines' callables)."""

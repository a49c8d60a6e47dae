"""The built-in schedules of the built-in periodic jobs (times in UTC).

Each is switched off or re-timed without code by `JOBYARD_SCHEDULE_<NAME>`: `off`, a 5-field cron
expression, or an interval in whole seconds, e.g.
`JOBYARD_SCHEDULE_MAINTENANCE_FILE_CLEANUP=off` or
`JOBYARD_SCHEDULE_ANALYTICS_DAILY_REPORT="30 7 * * *"`.
"""

from __future__ import annotations

from jobyard.job_engine.schedules import schedule

schedule("maintenance.token_cleanup", "maintenance.token_cleanup", cron="0 * * * *")
schedule("maintenance.file_cleanup", "maintenance.file_cleanup", cron="30 3 * * *")
schedule("analytics.daily_report", "analytics.daily_report", cron="0 6 * * *")
schedule("analytics.weekly_report", "analytics.weekly_report", cron="0 6 * * 1")

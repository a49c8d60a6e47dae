"""The non-transactional dispatch's one limit during a database outage.

`dispatch_job` without `connection=` sends the job at once and leaves its "queued" job log row to
this process's writer thread (joblog/writer.py), which keeps unwritten events in memory while
the database is down. That row is how a job is found again when Redis comes back empty (the
rescue's `recover_lost`), so an unwritten one is a job nothing would recover. Past
JOBYARD_JOB_LOG_DISPATCH_LIMIT unwritten events, dispatch refuses (`JobLogBacklogError`, a
`DispatchUnavailableError`: nothing started) instead of growing that exposure, and well before
the writer's own bound (`joblog.MAX_BUFFER`), so a dispatch's row is never the one it drops.
"""

from __future__ import annotations

from jobyard.dispatcher.errors import JobLogBacklogError
from jobyard.job_engine import env
from jobyard.job_engine.db import joblog


def check_job_log_backlog() -> None:
    """Raises JobLogBacklogError when this process's job log holds too many unwritten events."""
    writer = joblog.writer()
    if writer is None:  # JOBYARD_JOB_LOG=false: no log to keep complete
        return
    backlog = writer.backlog()
    if backlog < _limit(writer):
        return
    limit = f"{env.JOB_LOG_DISPATCH_LIMIT}={_limit(writer)}"
    raise JobLogBacklogError(
        f"dispatch refused: {backlog} job log events of this process are not written yet (the "
        f"database is unreachable), at the limit {limit}. A job "
        "started now could not be recovered if Redis lost it. Nothing was started: dispatch "
        "again once the database answers, or dispatch in a transaction (connection=...)."
    )


#: The limit, and the writer it was read for: read once per writer (`joblog.reset_writer` makes
#: a new one), not per dispatch, where reading the environment cost 3 of a dispatch_job's 62 us.
_read_for: tuple[joblog.JobLogWriter, int] | None = None


def _limit(writer: joblog.JobLogWriter) -> int:
    global _read_for
    if _read_for is None or _read_for[0] is not writer:
        _read_for = (writer, min(env.get_int(env.JOB_LOG_DISPATCH_LIMIT), joblog.MAX_BUFFER))
    return _read_for[1]

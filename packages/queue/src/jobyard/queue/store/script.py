"""The base of JobStore: jobyard.lua loaded once, called with EVALSHA; decoding its replies."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any, NamedTuple

import redis
from redis.exceptions import NoScriptError

from jobyard.job_engine import env
from jobyard.queue import keys

_SCRIPT = resources.files("jobyard.queue").joinpath("jobyard.lua").read_text()
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Reply(NamedTuple):
    """A Lua command's multi-value reply: a status word and, for some statuses, one detail
    (enqueue "exists": the owning engine; handoff "lost", cancel "done", replay "active": the
    job's state). A NamedTuple: built once per dispatch, where a frozen dataclass costs more."""

    status: str
    detail: str | None = None
    state: str | None = None

    @classmethod
    def decode(cls, raw: Any) -> Reply:
        if isinstance(raw, list | tuple):
            return cls(*[_text(value) for value in raw[:3]])
        return cls(_text(raw))


#: A jobyard.lua call: its keys, and its arguments (the command first).
EnqueueCall = tuple[list[str], tuple[Any, ...]]


class ScriptStore:
    """What every group of JobStore's commands shares: the client, the script, the job log's
    outbox key when changes are logged."""

    def __init__(self, client: redis.Redis, *, log_changes: bool = False) -> None:
        """`log_changes`: append every change this store makes to a job to the job log's outbox,
        for the shipper to write to the database (a worker's store, when the job log is on)."""
        self.client = client
        # Seconds a finished job's records stay in Redis (the job log keeps it for longer).
        self.retention = env.get_int(env.RECORD_RETENTION)
        self._sha = _SCRIPT_SHA
        self._events = [keys.job_log_events()] if log_changes else []

    @property
    def logs_changes(self) -> bool:
        return bool(self._events)

    def _call(self, keys_: list[str], *args: Any) -> Any:
        # EVALSHA directly: redis-py's Script wrapper costs a few microseconds a call, and
        # a worker makes one of these calls per job.
        try:
            return self._evalsha(self._sha, keys_, args)
        except NoScriptError:  # a new or flushed server: load the script once
            self._sha = self.client.script_load(_SCRIPT)
            return self._evalsha(self._sha, keys_, args)

    def _evalsha(self, sha: str, keys_: list[str], args: tuple[Any, ...]) -> Any:
        """One EVALSHA (jobyard.queue.direct sends it without redis-py's command machinery)."""
        return self.client.evalsha(sha, len(keys_), *keys_, *args)

    def _queue_keys(self, queue: str) -> list[str]:
        delay_queue = keys.delayed(queue)
        return [
            keys.dramatiq_queue(queue),
            keys.dramatiq_messages(queue),
            keys.dramatiq_queue(delay_queue),
            keys.dramatiq_messages(delay_queue),
        ]

"""JobStore's commands of a job's run on a worker: start, steps, progress, and its end
(finish, complete, reschedule), each acking the Dramatiq message it ran from (`Delivery`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jobyard.job_engine import crypto
from jobyard.queue import keys
from jobyard.queue.store.script import ScriptStore, _text


@dataclass(frozen=True)
class Delivery:
    """The Dramatiq message being processed, so our calls can ack it (see `ack` in the Lua)."""

    broker_id: str
    queue: str
    redis_message_id: str

    def keys(self) -> list[str]:
        return [keys.dramatiq_acks(self.broker_id, self.queue), keys.dramatiq_messages(self.queue)]


NO_DELIVERY = Delivery("", "", "")


@dataclass
class StartResult:
    status: str  # ok | lost | stale | done | cancelled | exhausted
    attempts: int = 0
    started_at: float = 0.0  # unix seconds of the job's first start
    steps: dict[str, str] = field(default_factory=dict)
    died: str = ""  # exhausted: how the last process that ran the job died
    # ok: step records of an earlier run may be missing from `steps` (see may_have_lost in
    # jobyard.lua): read the step journal too before running one.
    may_have_lost: bool = False


class RunCommands(ScriptStore):
    def start(
        self,
        job_id: str,
        job_name: str,
        seq: int,
        *,
        resume: bool,
        suspect_attempts: int = 0,
    ) -> StartResult:
        """`suspect_attempts`: for a suspect's message (see `reclaim`), the job's attempts: a
        suspect whose last run died alone with the last of them is "exhausted" (not started).
        (A job's flow-control limits are asked before, in the permit store.)"""
        reply = self._call(
            [keys.job(job_id), keys.steps(job_id), keys.lost_writes_before(), *self._events],
            "start",
            seq,
            "1" if resume else "0",
            suspect_attempts,
        )
        status = _text(reply[0])
        if status == "exhausted":
            return StartResult(status, attempts=int(reply[1]), died=_text(reply[2]))
        if status != "ok":
            return StartResult(status)
        flat = [_text(v) for v in reply[4:]]
        steps = {
            step: crypto.unseal_json(job_id, text)
            for step, text in zip(flat[::2], flat[1::2], strict=True)
        }
        return StartResult(
            status, int(reply[1]), int(reply[2]) / 1000, steps, may_have_lost=reply[3] == 1
        )

    def record_step(
        self, job_id: str, seq: int, step: str, result_json: str, timing_json: str = ""
    ) -> str:
        """ "ok", "lost" (the job is not ours any more) or "cancel" (stop at this boundary).
        `timing_json`: when the step ran, kept beside it (STEP_TIMING_PREFIX) for the timeline."""
        reply = self._call(
            [keys.job(job_id), keys.steps(job_id)],
            "step",
            seq,
            step,
            crypto.seal_json(job_id, result_json),
            self.retention,
            timing_json,
        )
        return _text(reply)

    def record_progress(self, job_id: str, seq: int, progress_json: str) -> bool:
        reply = self._call(
            [keys.job(job_id), *self._events],
            "progress",
            seq,
            crypto.seal_json(job_id, progress_json),
        )
        return _text(reply) == "ok"

    def mark_running(self, job_id: str, seq: int) -> bool:
        """Show a run that is still before its first step as running (see jobyard.lua)."""
        return bool(self._call([keys.job(job_id), *self._events], "mark_running", seq))

    def finish(
        self,
        job_id: str,
        seq: int,
        state: str,
        *,
        result: Any = None,
        error: str = "",
        error_class: str = "",
        delivery: Delivery = NO_DELIVERY,
        payload: Any = None,
        traceback: str = "",
        steps: Sequence[tuple[str, str, str]] = (),
    ) -> str | None:
        """The state written (`state`, or "cancelled" when steps come with it and a cancel was
        asked for while they ran), None when the run is not the job's any more. `steps`: (name,
        result JSON, timing JSON) of returned steps to record with the outcome, those
        `record_step` was not called for (see DramatiqContext.unrecorded)."""
        reply = self._call(
            [keys.job(job_id), keys.steps(job_id), *delivery.keys(), *self._events],
            "finish",
            seq,
            state,
            json.dumps(crypto.seal(job_id, result)),
            crypto.seal(job_id, error) if error else "",
            error_class,
            self.retention,
            delivery.redis_message_id,
            "" if payload is None else json.dumps(crypto.seal(job_id, payload)),
            crypto.seal(job_id, traceback) if traceback else "",
            *[
                part
                for name, result_json, timing_json in steps
                for part in (name, crypto.seal_json(job_id, result_json), timing_json)
            ],
        )
        written = _text(reply)
        return None if written == "lost" else (state if written == "ok" else written)

    def complete(
        self, job_id: str, seq: int, *, resume: bool, result: Any, delivery: Delivery = NO_DELIVERY
    ) -> StartResult:
        """Start and finish a run that used no step, in one call; status "ok" or why not."""
        reply = self._call(
            [keys.job(job_id), keys.steps(job_id), *delivery.keys(), *self._events],
            "complete",
            seq,
            "1" if resume else "0",
            json.dumps(crypto.seal(job_id, result)),
            self.retention,
            delivery.redis_message_id,
        )
        status = _text(reply[0])
        if status != "ok":
            return StartResult(status)
        return StartResult(status, int(reply[1]), int(reply[2]) / 1000)

    def reschedule(
        self,
        job_id: str,
        seq: int,
        next_seq: int,
        state: str,
        delay_queue: str,
        redis_message_id: str,
        message: bytes,
        *,
        error: str = "",
        error_class: str = "",
        delivery: Delivery = NO_DELIVERY,
        run_at_ms: int = 0,
        hold: tuple[str, str, str] | None = None,
        waiting: tuple[str, str] | None = None,
        announce: bool = False,
    ) -> bool:
        """`hold`: (queue, display_state, waiting_reason) of a job a flow-control limit
        parks: its next message waits in the queue's parked set until `run_at_ms` or a wake,
        not on the delay queue (`delay_queue` is then unused). `waiting`: (display_state,
        waiting_reason) of a job waiting for other jobs or an event: on the delay queue, as a
        sleep, its record showing them; `announce`: its first look, an event of the job's
        history (the job log's merge adds none for a look that changes nothing else)."""
        if hold is None:
            where = [keys.dramatiq_queue(delay_queue), keys.dramatiq_messages(delay_queue)]
            shown: tuple[str, ...] = (
                (*waiting, "delayed", "1" if announce else "") if waiting else ()
            )
        else:
            where = [keys.parked(hold[0]), keys.dramatiq_messages(hold[0])]
            shown = hold[1:]
        reply = self._call(
            [keys.job(job_id), *where, *delivery.keys(), *self._events],
            "reschedule",
            seq,
            next_seq,
            state,
            redis_message_id,
            message,
            crypto.seal(job_id, error) if error else "",
            error_class,
            delivery.redis_message_id,
            run_at_ms,
            *shown,
        )
        return _text(reply) == "ok"

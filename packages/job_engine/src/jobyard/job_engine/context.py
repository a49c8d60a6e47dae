"""The small surface a job handler talks to. Each engine implements it; handlers never see which.

Rules for handler bodies (the orchestration):

* Deterministic: no I/O, no wall clock, no randomness, no threads. Put every side effect in a step:
  ``await ctx.run("fetch", fetch_page, url)``. On Temporal the handler *is* a workflow and is
  replayed; on Dramatiq it is re-run from the top after a retry or a long sleep, and finished steps
  return their recorded results instead of running again.
* Step functions are module-level functions (sync or async) so either engine can import them by
  name; their arguments and results are JSON data (dicts, lists, str, numbers, bool, None).
* Step names are unique within one job run; names starting with ``__`` are the engines' own.
* Pause with ``await ctx.sleep(seconds)``, never ``asyncio.sleep``: it is durable on both engines.

What crosses the boundary between a handler and an engine (`JobContext`), and nothing else:

``ctx.job_id``, ``ctx.job_name``
    Strings, fixed for the job's whole life, replays included.
``ctx.attempt``
    The highest attempt the job has reached, from 1. Dramatiq retries a job by running it again
    from the top (attempt n+1, finished steps skipped); Temporal and the inline engine retry the
    failed step alone. Either way, once a step has succeeded on its nth try, ``attempt >= n``. A
    durable sleep is not an attempt.
``await ctx.run(step, fn, *args) -> result``
    ``fn``'s import path and ``args`` (JSON) go in; ``fn``'s result comes back as JSON data,
    decoded, the same value whether the step ran now or a previous run recorded it. A result that
    is not JSON data fails the job with a `StepError`, as does a name used twice or a ``fn`` that
    is not a module-level function. Raise `PermanentError` in ``fn`` to fail without retrying.
``await ctx.sleep(seconds)``
    A durable pause: a Temporal timer; on Dramatiq, a sleep over a second parks the job as a
    delayed message and the handler resumes past its finished steps.
``await ctx.progress(value)``
    A fraction 0..1 or a JSON dict that ``get_job(id).progress`` shows.
``await ctx.child(name, payload, key=None) -> result``
    Starts job ``name`` as a child and returns its result once it ended. Its id is derived from
    the job's and the call's place (or ``key``, unique within the job), so a retried or resumed
    parent never starts it twice. While it runs the parent holds no worker (it parks as a long
    ``ctx.sleep`` does). A child that ends failed, dead or cancelled raises `ChildFailedError`.
``await ctx.children([(name, payload), ...], return_exceptions=False) -> [result, ...]``
    The same for many children (an element may be ``(name, payload, key)``), started together
    and awaited together: the results in order once every child ended. With
    ``return_exceptions`` a failed child's `ChildFailedError` takes its place instead of being
    raised. More than ``JOBYARD_MAX_CHILDREN`` children are refused before any starts.
``await ctx.wait_for_event(name, match={...}, timeout=None) -> data | None``
    Parks the job (no worker held) until an event ``name`` whose data has ``match``'s fields
    (``send_event``, ``POST /events/{name}``) is sent, and returns its data; None once
    ``timeout`` seconds passed. An event sent up to ``JOBYARD_EVENT_LOOKBACK`` seconds before the
    wait began counts; each wait takes one event, a job never the same twice (see
    jobyard.job_engine.events).
``await ctx.upstream() -> {job_id: result}``
    For a job dispatched with ``after=[job_id, ...]``: those jobs' results, by id (it started
    once all had ended). With ``after_failure="run"``, a job that did not succeed maps to its
    `ChildFailedError`. ``{}`` for a job dispatched without ``after``.
``ctx.step_key(step) -> str``
    ``f"{job_id}:{step}"``, the idempotency key for the side effect of ``step``. A step whose
    function returned never runs again, but one interrupted (a worker killed mid-step, a timeout)
    is run again: at least once. Hand the key to the other side (an ``Idempotency-Key`` header, a
    unique column) so that the second run does nothing new: ``await ctx.run("charge", charge,
    ctx.step_key("charge"), amount)``. It is the same on every attempt, resume, engine and replay.

`BaseJobContext` does the bookkeeping behind these rules once, for every engine.
"""

from __future__ import annotations

import importlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from jobyard.job_engine import env
from jobyard.job_engine.children import START_SUFFIX, child_job_id, start_children
from jobyard.job_engine.errors import (
    ChildFailedError,
    StepError,
    UnknownJobError,
    UpstreamFailedError,
)
from jobyard.job_engine.events import check_event_data, check_event_name
from jobyard.job_engine.states import JobState
from jobyard.job_engine.waits import (
    Waiting,
    waiting_for_children,
    waiting_for_event,
    waiting_for_upstream,
)

#: Step names with this prefix belong to the engines (the records of durable sleeps).
RESERVED_STEP_PREFIX = "__"
SLEEP_STEP_PREFIX = "__sleep__:"
#: Beside a finished step, where an engine that records steps itself keeps when it ran:
#: {"start": unix s, "end": unix s, "attempt": n} (the job page's timeline).
STEP_TIMING_PREFIX = "__timing__:"
#: The record of the nth ctx.child/children call's fan-in: every child's outcome, in order.
CHILDREN_STEP_PREFIX = "__children__:"
#: The record of the nth ctx.wait_for_event's event (or None: it timed out).
EVENT_STEP_PREFIX = "__event__:"
#: Beside a wait's record (`<wait>:since`): when the wait began, on the engine that began it.
WAIT_SINCE_SUFFIX = ":since"
#: The record of the endings of the jobs a job was dispatched `after` (their outcomes, in order).
UPSTREAM_STEP = "__upstream__"
#: What a job dispatched `after` other jobs does when one of them did not succeed.
AFTER_CANCEL, AFTER_RUN = "cancel", "run"
AFTER_FAILURES = (AFTER_CANCEL, AFTER_RUN)
#: A child: (job name, payload, key or None).
ChildCall = tuple[str, Any, str | None]


@runtime_checkable
class JobContext(Protocol):
    """What a handler may use; see the module docstring for what each member promises."""

    @property
    def job_id(self) -> str: ...

    @property
    def job_name(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    async def run(self, step: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` once as a recorded, retried step and return its JSON result."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Pause durably for `seconds`."""
        ...

    async def progress(self, value: float | dict[str, Any]) -> None:
        """Publish progress (a fraction 0..1 or a JSON dict) for `get_job` to show."""
        ...

    def step_key(self, step: str) -> str:
        """The stable idempotency key for the side effect of `step`."""
        ...

    async def child(self, name: str, payload: Any, key: str | None = None) -> Any:
        """Start job `name` as a child and return its result once it ended."""
        ...

    async def children(
        self, calls: list[tuple[Any, ...]], return_exceptions: bool = False
    ) -> list[Any]:
        """Start many children at once; their results in order once every one ended."""
        ...

    async def upstream(self) -> dict[str, Any]:
        """The results of the jobs this one was dispatched `after`, by id."""
        ...

    async def wait_for_event(
        self, name: str, match: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any] | None:
        """The data of the event `name` matching `match`, or None after `timeout` seconds."""
        ...


def failure_of(outcome: dict[str, Any]) -> ChildFailedError:
    """The error of a job a job waited for that did not succeed (an outcome of waits.py)."""
    return ChildFailedError(outcome["job_id"], outcome["state"], outcome["error"])


def step_key(job_id: str, step: str) -> str:
    return f"{job_id}:{step}"


def step_ref(fn: Callable[..., Any]) -> str:
    """The import path `module:qualname` that lets another process find `fn`."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise StepError(
            f"step function {fn!r} must be a module-level function (no lambdas or closures), "
            "so that every engine can import it by name"
        )
    return f"{module}:{qualname}"


def resolve_step(ref: str) -> Callable[..., Any]:
    module_name, _, qualname = ref.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise StepError(f"step function {ref!r} is not callable")
    fn: Callable[..., Any] = target
    return fn


def encode_json(what: str, value: Any) -> str:
    """`value` as JSON text, or a StepError naming `what` (the value must survive a record)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise StepError(f"{what} must be JSON data: {exc}") from exc


class BaseJobContext(ABC):
    """The step bookkeeping every engine's ctx shares, so the engines cannot disagree on it:
    step names, the module-level rule for step functions, JSON results, sleep records, step keys.

    An engine supplies `attempt` and how a checked step runs, a sleep waits and progress is shown.
    """

    def __init__(self, job_id: str, job_name: str) -> None:
        self.job_id = job_id
        self.job_name = job_name
        self._step_names: set[str] = set()
        self._sleeps = 0
        self._fan_ins = 0
        self._child_keys: set[str] = set()
        self._upstream: dict[str, Any] = {}
        self._event_waits = 0
        self._taken_events: list[int] = []  # ids of the events this run's waits took
        #: When this run's flow-control permits were granted (the permit store's clock, epoch
        #: seconds): its start as its limits count it. None for a job without limits.
        self.permit_at: float | None = None

    @property
    @abstractmethod
    def attempt(self) -> int: ...

    def step_key(self, step: str) -> str:
        return step_key(self.job_id, step)

    async def run(self, step: str, fn: Callable[..., Any], *args: Any) -> Any:
        if not isinstance(step, str) or not step:
            raise StepError(f"a step name must be a non-empty string, not {step!r}")
        if step.startswith(RESERVED_STEP_PREFIX):
            raise StepError(
                f"step name {step!r}: names starting with {RESERVED_STEP_PREFIX!r} are reserved"
            )
        ref = step_ref(fn)  # the same rule on every engine, so a job that runs on one runs on all
        self._claim(step)
        return await self._run_step(step, ref, fn, args)

    async def sleep(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise StepError(f"ctx.sleep takes a number of seconds, not {seconds!r}")
        if not math.isfinite(seconds) or seconds < 0:
            raise StepError(f"ctx.sleep takes a finite number of seconds >= 0, not {seconds!r}")
        self._sleeps += 1
        name = f"{SLEEP_STEP_PREFIX}{self._sleeps}"
        self._claim(name)
        await self._sleep(name, float(seconds))

    async def progress(self, value: float | dict[str, Any]) -> None:
        await self._progress(value, encode_json("progress", value))

    async def child(self, name: str, payload: Any, key: str | None = None) -> Any:
        [result] = await self._fan_out([(name, payload, key)], return_exceptions=False)
        return result

    async def children(
        self, calls: list[tuple[Any, ...]], return_exceptions: bool = False
    ) -> list[Any]:
        checked: list[ChildCall] = []
        for call in calls:
            if not isinstance(call, tuple | list) or len(call) not in (2, 3):
                raise StepError(
                    f"ctx.children takes (name, payload) or (name, payload, key) pairs, "
                    f"not {call!r}"
                )
            checked.append((call[0], call[1], call[2] if len(call) == 3 else None))
        return await self._fan_out(checked, return_exceptions)

    async def upstream(self) -> dict[str, Any]:
        return dict(self._upstream)

    async def wait_for_event(
        self, name: str, match: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any] | None:
        try:
            check_event_name(name)
            check_event_data(match or {}, "ctx.wait_for_event's match")
        except ValueError as exc:
            raise StepError(str(exc)) from exc
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout < 0
        ):
            raise StepError(f"ctx.wait_for_event's timeout must be seconds >= 0, not {timeout!r}")
        self._event_waits += 1
        record = f"{EVENT_STEP_PREFIX}{self._event_waits}"
        self._claim(record)
        seconds = None if timeout is None else float(timeout)
        wait = {
            "name": name,
            "match": match or {},
            "timeout": seconds,
            "taken": list(self._taken_events),
        }
        shown = waiting_for_event(name, match or {}, seconds)
        event = await self._wait_for_event(record, wait, shown)
        if event is None:
            return None
        self._taken_events.append(event["id"])
        data: dict[str, Any] = event["data"]
        return data

    async def _wait_for_event(
        self, record: str, wait: dict[str, Any], shown: Waiting
    ) -> dict[str, Any] | None:
        """Park until the event `wait` ({"name", "match", "timeout", "taken"}) takes is sent, or
        its timeout; the event ({"id", "name", "data", "sent_at"}) or None, recorded as
        `record`. See jobyard.job_engine.events. `shown`: the job's status meanwhile."""
        raise StepError(f"the {type(self).__name__} engine cannot wait for events")

    async def wait_upstream(self, after: dict[str, Any]) -> None:
        """Before the handler: park until every job of `after` ({"ids": [...], "on_failure":
        "cancel" | "run"}, the dispatch's `after=`) ended, then keep their results for
        `upstream()`. One that did not succeed raises `UpstreamFailedError` (the engine ends
        the job cancelled) unless on_failure is "run"."""
        self._claim(UPSTREAM_STEP)
        ids = list(after["ids"])
        outcomes = await self._wait_for_jobs(UPSTREAM_STEP, ids, waiting_for_upstream(ids))
        for outcome in outcomes:
            if outcome["state"] == JobState.SUCCEEDED:
                self._upstream[outcome["job_id"]] = outcome["result"]
                continue
            if after.get("on_failure", AFTER_CANCEL) == AFTER_CANCEL:
                raise UpstreamFailedError(outcome["job_id"], outcome["state"], outcome["error"])
            self._upstream[outcome["job_id"]] = failure_of(outcome)

    async def _fan_out(self, calls: list[ChildCall], return_exceptions: bool) -> list[Any]:
        """Checks, ids and the fan-in's record name, the same on every engine; the engine
        starts the children and waits (`_fan_in`)."""
        limit = env.get_int(env.MAX_CHILDREN)
        if len(calls) > limit:
            raise StepError(
                f"ctx.children asked for {len(calls)} children; JOBYARD_MAX_CHILDREN allows "
                f"{limit} in one call. None was started"
            )
        from jobyard.job_engine.registry import get_spec  # registry imports this module

        for name in {call[0] for call in calls if isinstance(call[0], str)}:
            try:  # an unknown job fails the parent here (a bug: not retried), none started
                get_spec(name)
            except UnknownJobError as exc:
                raise StepError(f"ctx.children: {exc}. None was started") from exc
        self._fan_ins += 1
        wait = f"{CHILDREN_STEP_PREFIX}{self._fan_ins}"
        self._claim(wait)
        children = []
        keyed: dict[str, str] = {}  # place -> key, of the children that have one
        for index, (name, payload, key) in enumerate(calls):
            if not isinstance(name, str) or not name:
                raise StepError(f"a child's job name must be a non-empty string, not {name!r}")
            if key is not None:
                if not isinstance(key, str) or not key:
                    raise StepError(f"a child's key must be a non-empty string, not {key!r}")
                if key in self._child_keys:
                    raise StepError(f"child key {key!r} is used twice in job {self.job_name!r}")
                self._child_keys.add(key)
                keyed[str(index)] = key
            children.append((name, payload, child_job_id(self.job_id, self._fan_ins, index, key)))
        if not children:
            return []
        outcomes = await self._fan_in(wait, children, keyed)
        results: list[Any] = []
        for outcome in outcomes:
            if outcome["state"] == JobState.SUCCEEDED:
                results.append(outcome["result"])
                continue
            if not return_exceptions:
                raise failure_of(outcome)
            results.append(failure_of(outcome))
        return results

    async def _fan_in(
        self, wait: str, children: list[tuple[str, Any, str]], keyed: dict[str, str]
    ) -> list[dict[str, Any]]:
        """Start the children (one recorded step: a resumed parent does not dispatch again, and
        their ids dedupe a step that ran twice; its result, how many and the keys, lets a cancel
        find them: see db/outcomes.py), then wait for every one to end. Returns each child's
        outcome ({"job_id", "state", "result", "error"}), in order. `keyed`: place -> key."""
        start = [list(child) for child in children]
        await self._run_step(
            wait + START_SUFFIX, step_ref(start_children), start_children, (start, keyed)
        )
        ids = [job_id for _, _, job_id in children]
        return await self._wait_for_jobs(wait, ids, waiting_for_children(ids))

    async def _wait_for_jobs(
        self, wait: str, job_ids: list[str], shown: Waiting
    ) -> list[dict[str, Any]]:
        """Park until every one of `job_ids` ended; their outcomes in order, recorded as `wait`
        (a resumed run gets the recorded outcomes back). See jobyard.job_engine.waits.
        `shown`: the job's status meanwhile."""
        raise StepError(f"the {type(self).__name__} engine cannot wait for other jobs")

    def _claim(self, step: str) -> None:
        if step in self._step_names:
            raise StepError(f"step name {step!r} is used twice in job {self.job_name!r}")
        self._step_names.add(step)

    def encode_result(self, step: str, value: Any) -> str:
        return encode_json(f"the result of step {step!r}", value)

    @abstractmethod
    async def _run_step(
        self, step: str, ref: str, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        """Run (or look up) a checked step; return its result as decoded JSON data."""

    @abstractmethod
    async def _sleep(self, name: str, seconds: float) -> None:
        """Wait `seconds` durably; `name` is this sleep's unique record name."""

    @abstractmethod
    async def _progress(self, value: Any, encoded: str) -> None:
        """Publish a progress value (`encoded` is its JSON text)."""


class StepRetryContext(BaseJobContext):
    """For engines that retry a failed step by itself (Temporal, inline) rather than the whole
    job: the job's attempt is the highest try any step has needed, as Dramatiq's would be."""

    def __init__(self, job_id: str, job_name: str) -> None:
        super().__init__(job_id, job_name)
        self.attempts = 1  # the name Temporal's workflow reads for its status query

    @property
    def attempt(self) -> int:
        return self.attempts

    def saw_attempt(self, attempt: int) -> None:
        self.attempts = max(self.attempts, attempt)

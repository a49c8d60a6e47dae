"""Starting a job from inside a job (a callback webhook, one email per recipient).

`ctx.child` and `ctx.children` (jobyard.job_engine.context) start children through
`start_children` and wait for their results; `dispatch_child` starts one and forgets it.

job_engine does not depend on the dispatcher; each process that runs jobs installs it here at
start-up (`jobyard worker`, `jobyard temporal-worker`). Call it from a step so that a retried
parent does not dispatch twice, and give the child a job id derived from the parent's, so that
even a repeated step starts the child once (dispatch treats a known job id as already started):

    await ctx.run("notify", dispatch_child, "webhook.deliver", body, f"{ctx.job_id}:notify")
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from jobyard.job_engine.errors import InvalidPayloadError, JobyardError, StepError

ChildDispatcher = Callable[[str, Any, str], dict[str, Any]]
#: Many children at once: (name, payload, job_id) each; a handle as JSON or the job's error each.
ChildBatchDispatcher = Callable[[list[tuple[str, Any, str]]], list[dict[str, Any] | Exception]]

#: The dispatcher's job id rule (jobyard.dispatcher.dispatch.JOB_ID_PATTERN), restated here
#: because job_engine does not import the dispatcher.
MAX_JOB_ID = 200
_ID_CHARS = re.compile(r"[^A-Za-z0-9._:@/-]")
_DIGEST_CHARS = 24  # hex of SHA-256: 96 bits, no collision among one parent's children

_dispatcher: ChildDispatcher | None = None
_batch_dispatcher: ChildBatchDispatcher | None = None


def install_dispatcher(
    dispatcher: ChildDispatcher | None, many: ChildBatchDispatcher | None = None
) -> None:
    """`dispatcher(name, payload, job_id) -> {"job_id": ..., "engine": ...}`; `many`, when the
    process has one, dispatches a list of children in batches (`dispatch_children`)."""
    global _dispatcher, _batch_dispatcher
    _dispatcher = dispatcher
    _batch_dispatcher = many


def fit_job_id(job_id: str) -> str:
    """`job_id` itself when it obeys the id rule, else a stable id that does.

    A derived id (`<parent>:webhook`) passes 200 characters when the parent's id is long; it is
    then cut and a digest of the whole id appended, keeping its end (which names the child) when
    that fits. The same input always gives the same id, so a repeated step still starts the child
    once, and different inputs give different ids.
    """
    if len(job_id) <= MAX_JOB_ID and _ID_CHARS.search(job_id) is None and job_id[:1].isalnum():
        return job_id
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]
    clean = _ID_CHARS.sub("-", job_id)
    head, sep, tail = clean.rpartition(":")
    if not sep or len(tail) > 40:
        head, tail = clean, ""
    keep = MAX_JOB_ID - len(digest) - 1 - (len(tail) + 1 if tail else 0)
    fitted = f"{head[:keep]}-{digest}" + (f":{tail}" if tail else "")
    return fitted if fitted[:1].isalnum() else f"j{fitted[1:]}"


def dispatch_child(name: str, payload: Any, job_id: str) -> dict[str, Any]:
    """Step function: dispatch `name` with a stable `job_id` (made to fit the id rule, see
    `fit_job_id`); returns the child's handle as JSON."""
    if _dispatcher is None:
        raise JobyardError(
            "no dispatcher is installed in this process; "
            "call jobyard.job_engine.children.install_dispatcher() at start-up"
        )
    return _dispatcher(name, payload, fit_job_id(job_id))


def dispatch_children(children: list[tuple[str, Any, str]]) -> list[dict[str, Any]]:
    """Step function: `dispatch_child` of each (name, payload, job_id), in batches where the
    process's dispatcher can. If any child could not be dispatched, the others still are and
    the first error is raised: a retry of the step starts only what did not start (the ids)."""
    if _batch_dispatcher is None:
        return [dispatch_child(name, payload, job_id) for name, payload, job_id in children]
    results = _batch_dispatcher(
        [(name, payload, fit_job_id(job_id)) for name, payload, job_id in children]
    )
    handles = []
    for result in results:
        if isinstance(result, Exception):
            raise result
        handles.append(result)
    return handles


#: The step that starts a ctx.children call's children is named after the wait's: `<wait>:start`.
START_SUFFIX = ":start"


def child_job_id(parent_id: str, fan_in: int, index: int, key: str | None) -> str:
    """The id of a child of `parent_id`: from its `key` when given (`<parent>:child:<key>`),
    else from its place (`<parent>:child<fan_in>-<index>`: the `fan_in`th ctx.child/children
    call of the run, its `index`th child). The same on every retry, resume and engine, so a
    parent never starts a child twice (dispatch dedupes a known id)."""
    if key is not None:
        return fit_job_id(f"{parent_id}:child:{key}")
    return fit_job_id(f"{parent_id}:child{fan_in}-{index}")


def check_children(children: list[tuple[str, Any, str]] | list[list[Any]]) -> None:
    """Every child's payload valid for its job, or a StepError naming the first that is not
    (a bug in the parent: not retried), before any child starts."""
    from jobyard.job_engine.registry import get_spec  # the registry imports ctx's module

    for index, (name, payload, _) in enumerate(children):
        try:
            get_spec(name).validate(payload)
        except InvalidPayloadError as exc:
            raise StepError(f"child {index} ({name}): {exc}. None was started") from exc


def start_children(children: list[list[Any]], keyed: dict[str, str]) -> dict[str, Any]:
    """Step function of ctx.children: dispatch each [name, payload, job_id] (in batches where
    the process can). Returns how many and `keyed` (place -> key): from its record, the
    children's ids can be derived again (`child_ids`). Needs the job log, where the parent
    learns how its children ended. A child that could not be dispatched fails the step, and
    its retry starts only what did not start (the ids)."""
    from jobyard.job_engine.db import joblog

    if not joblog.enabled():
        raise StepError(
            "ctx.child and ctx.children need the job log (JOBYARD_JOB_LOG=true and a "
            "DATABASE_URL): a parent learns there how its children ended"
        )
    check_children(children)
    dispatch_children([(name, payload, job_id) for name, payload, job_id in children])
    return {"count": len(children), "keyed": keyed}


def child_ids(parent_id: str, fan_in: int, started: dict[str, Any]) -> list[str]:
    """The ids of the children of a parent's `fan_in`th call, from its start step's record."""
    keyed = started["keyed"]
    return [
        child_job_id(parent_id, fan_in, index, keyed.get(str(index)))
        for index in range(started["count"])
    ]

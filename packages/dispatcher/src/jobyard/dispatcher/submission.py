"""A dispatch's arguments checked and encoded: what crosses to an engine. Bad input is refused
here, with the argument named, before any engine or the id registry is touched."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from jobyard.dispatcher.engines import Submission
from jobyard.dispatcher.models import NO_OPTIONS, DispatchOptions, DispatchRequest
from jobyard.job_engine import RetryPolicy, UnsafeURLError, env, get_spec, netguard
from jobyard.job_engine.context import AFTER_CANCEL, AFTER_FAILURES
from jobyard.job_engine.flow.declarations import payload_key, validate_priority
from jobyard.job_engine.ids import new_job_id

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}")
MAX_DELAY_SECONDS = 7 * 24 * 3600  # Dramatiq's delay limit; Temporal would allow more


def check_job_id(job_id: str | None) -> str:
    """A caller's job id, or a new one when it gave none."""
    if job_id is None:
        return new_job_id()
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(
            f"invalid job_id {job_id!r}: 1-200 characters of letters, digits and ._:@/- "
            "starting with a letter or digit"
        )
    return job_id


def check_webhook_url(url: str | None) -> str | None:
    if url is None:
        return None
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"invalid webhook_url {url!r}: an http(s) URL is required")
    try:
        return netguard.check_url(url)  # a literal private address is refused here already
    except UnsafeURLError as exc:
        raise ValueError(f"invalid webhook_url {url!r}: {exc.reason}") from exc


def check_retry(retry: RetryPolicy | None) -> dict[str, Any] | None:
    if retry is None:
        return None
    if not isinstance(retry, RetryPolicy):
        raise ValueError(f"invalid retry {retry!r}: a jobyard.job_engine.RetryPolicy is required")
    return retry.overrides()


def check_delay(delay: float | None) -> float | None:
    if delay is None:
        return None
    if not isinstance(delay, int | float) or delay < 0 or delay > MAX_DELAY_SECONDS:
        raise ValueError(f"invalid delay {delay!r}: seconds between 0 and {MAX_DELAY_SECONDS}")
    return float(delay) or None


def check_after(after: Any, after_failure: str) -> dict[str, Any] | None:
    """`after=` as the job's option ({"ids", "on_failure"}), None when there is none. Whether
    the ids exist is checked by the dispatcher (upstream.py): it needs the engines."""
    if after_failure not in AFTER_FAILURES:
        raise ValueError(f"invalid after_failure {after_failure!r}: 'cancel' or 'run'")
    if after is None:
        return None
    if isinstance(after, str) or not isinstance(after, list | tuple):
        raise ValueError(f"invalid after {after!r}: a list of job ids is required")
    for job_id in after:
        if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
            raise ValueError(f"invalid after: {job_id!r} is not a job id")
    ids = list(dict.fromkeys(after))
    limit = env.get_int(env.MAX_CHILDREN)
    if len(ids) > limit:
        raise ValueError(f"invalid after: {len(ids)} jobs; JOBYARD_MAX_CHILDREN allows {limit}")
    return {"ids": ids, "on_failure": after_failure} if ids else None


def submission_of(request: DispatchRequest) -> Submission:
    """`make_submission` of one `dispatch_many` request."""
    return make_submission(
        request.name, request.payload, request.job_id, request.delay, request.webhook_url,
        request.retry, request.priority, request.after, request.after_failure,
    )  # fmt: skip


def make_submission(
    name: str,
    payload: Any,
    job_id: str | None,
    delay: float | None,
    webhook_url: str | None,
    retry: RetryPolicy | None,
    priority: int | None = None,
    after: list[str] | None = None,
    after_failure: str = AFTER_CANCEL,
) -> Submission:
    """A dispatch's arguments checked and encoded: what crosses to an engine. `priority`: the
    dispatch's (InvalidPriorityError unless an int from -100 to 100), else the job's."""
    spec = get_spec(name)
    encoded = spec.encode_with_text(payload)
    chosen = spec.priority if priority is None else validate_priority(priority)
    if spec.limited:  # a payload without a limit's key is refused here (422), never unlimited
        for limit in spec.limits:
            payload_key(spec.name, encoded.data, limit.key_path)
    upstream = check_after(after, after_failure)
    if delay is None and webhook_url is None and retry is None and not chosen and not upstream:
        options = NO_OPTIONS
    else:
        options = DispatchOptions(
            delay=check_delay(delay),
            webhook_url=check_webhook_url(webhook_url),
            retry=check_retry(retry),
            priority=chosen,
            after=upstream,
        )
    return Submission(
        check_job_id(job_id), spec.name, spec.queue, encoded.data, options,
        payload_json=encoded.text,
    )  # fmt: skip

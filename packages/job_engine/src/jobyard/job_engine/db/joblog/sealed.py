"""Which of the job log's columns hold a job's private data, sealed with encryption on
(jobyard.job_engine.crypto): the payload, the result, the error and its traceback, progress.
Everything else (names, queues, states, times, ids, error classes) stays readable, so listings,
graphs and the rescue work on it. The writer seals a batch in its own thread, off dispatch's
path; the Dramatiq shipper's changes come sealed from Redis already."""

from __future__ import annotations

from typing import Any

from jobyard.job_engine import crypto
from jobyard.job_engine.db.joblog.queued import QueuedBatch

#: Table -> its sealed columns (`jobyard keys rotate` re-encrypts these).
SEALED_COLUMNS: dict[str, tuple[str, ...]] = {
    "job_log": ("payload", "result", "error_message", "error_traceback", "progress"),
    "job_events": ("progress", "error"),
}
_FIELDS = SEALED_COLUMNS["job_log"]


def sealed_events(
    events: list[tuple[float, str, dict[str, Any]]],
) -> list[tuple[float, str, dict[str, Any]]]:
    """`record`'s events with their private fields sealed (as they are with encryption off)."""
    if crypto.RING is None:
        return events
    out = []
    for ts, job_id, fields in events:
        if any(fields.get(name) is not None for name in _FIELDS):
            fields = {
                name: crypto.seal(job_id, value) if name in _FIELDS else value
                for name, value in fields.items()
            }
        out.append((ts, job_id, fields))
    return out


def sealed_batches(batches: list[QueuedBatch]) -> list[QueuedBatch]:
    """`record_queued`'s batches with each payload's JSON text sealed."""
    if crypto.RING is None:
        return batches
    return [
        batch._replace(
            jobs=[
                (job_id, crypto.seal_json(job_id, payload.decode()).encode())
                for job_id, payload in batch.jobs
            ]
        )
        for batch in batches
    ]


def opened(job_id: str, values: dict[str, Any], table: str = "job_log") -> dict[str, Any]:
    """A row's values (column -> value) with its sealed columns opened."""
    for name in SEALED_COLUMNS[table]:
        if crypto.is_sealed(values.get(name)):
            values[name] = crypto.unseal(job_id, values[name])
    return values


def opened_for_listing(job_id: str, values: dict[str, Any]) -> dict[str, Any]:
    """`opened`, for a listing of many jobs: a value whose key is missing or that does not
    decrypt says so in its place rather than fail the whole page."""
    try:
        return opened(job_id, values)
    except (crypto.MissingEncryptionKeyError, crypto.DecryptionError) as exc:
        for name in SEALED_COLUMNS["job_log"]:
            if crypto.is_sealed(values.get(name)):
                values[name] = f"(encrypted: {exc})"
        return values

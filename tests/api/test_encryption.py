"""Payloads, step results, results, errors and progress encrypted wherever they rest (issue 33):
real jobs carry a canary string through each of them, on both engines; then the canary is
searched for in every Redis key (SCAN + DUMP, with RDB compression off so a DUMP shows what a
dump file would), in pg_dump of the job log's database and in Temporal's histories
(`temporal workflow show`): 0 times. The same jobs read back intact through get_job, the API
and the SSE stream."""

from __future__ import annotations

import base64
import json
import secrets
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from jobyard.dispatcher import dispatch_job, get_job, get_job_record
from jobyard.job_engine import crypto, env
from jobyard.job_engine.db import get_engine
from jobyard.job_engine.db.rotation import rotate
from tests.api.conftest import JOB_MODULES, ApiServer, on_engine
from tests.api.test_events import read_stream
from tests.engines import Engines
from tests.support import RedisServer, TemporalDevServer, temporal_cli, wait_for

KEY = crypto.new_key()
#: How the canary jobs end: a handler's error is the job's "dead" on Dramatiq (its one attempt
#: used) and "failed" on Temporal (its steps retried, the workflow not).
ENDED = ("succeeded", "failed", "dead")


@pytest.fixture
def canary() -> str:
    return f"canary-{secrets.token_hex(8)}"


@pytest.fixture
def encrypted(monkeypatch: pytest.MonkeyPatch, api_job_modules: None) -> Iterator[None]:
    """Encryption on in this process and in every worker started after this."""
    monkeypatch.setenv(env.ENCRYPTION_KEYS, f"k1:{KEY}")
    monkeypatch.setenv(env.JOB_MODULES, f"{JOB_MODULES},tests.crypto_jobs")
    crypto.reset()
    yield
    monkeypatch.delenv(env.ENCRYPTION_KEYS)
    crypto.reset()


#: Each Redis type's values, read whole.
READERS: dict[bytes, Any] = {
    b"hash": lambda client, key: client.hgetall(key),
    b"stream": lambda client, key: client.xrange(key),
    b"list": lambda client, key: client.lrange(key, 0, -1),
    b"zset": lambda client, key: client.zrange(key, 0, -1),
    b"set": lambda client, key: client.smembers(key),
    b"string": lambda client, key: client.get(key),
}


#: The canary jobs each test runs: one to its end, one dead (failed), one parked in ctx.sleep.
JOBS: list[dict[str, Any]] = [{}, {"fail": True}, {"sleep": 600}]
#: Delayed jobs, and as many parked ones, across the rotation test's key change.
ROTATION_JOBS = 25


def send(canary: str, secret: dict[str, str], engine: str, **payload: Any) -> str:
    """Dispatches a canary job (its own canary in `secret`, by job id) expected on `engine`."""
    own = f"{canary}-{len(secret)}"
    handle = dispatch_job("test.canary", {"secret": own, **payload})
    assert handle.engine == engine
    secret[handle.job_id] = own
    return handle.job_id


def redis_occurrences(redis_server: RedisServer, needle: str) -> dict[str, int]:
    """Key -> times `needle` appears in its DUMP (RDB compression off) or in its values."""
    client = redis_server.client()
    found: dict[str, int] = {}
    try:
        client.config_set("rdbcompression", "no")
        for key in client.scan_iter(count=1000):
            dumped = client.dump(key) or b""
            read = READERS.get(client.type(key))
            values = read(client, key) if read is not None else None
            count = dumped.count(needle.encode()) + repr(values).count(needle)
            if count:
                found[key.decode()] = count
    finally:
        client.close()
    return found


def pg_dump_occurrences(database_url: str, needle: str) -> int:
    url = make_url(database_url)
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    dumped = subprocess.run(
        ["pg_dump", "--data-only", libpq], capture_output=True, check=True, timeout=120
    ).stdout
    return dumped.count(needle.encode())


def assert_read_back_intact(api: ApiServer, ok: str, dead: str, secret: dict[str, str]) -> None:
    """get_job, GET /jobs/{id} and the SSE stream show what the handlers were given and did
    (the steps on Dramatiq, whose records the detail shows: Temporal keeps them in history)."""
    assert get_job(ok).result == {"result": secret[ok], "step saw": secret[ok]}
    assert secret[dead] in (get_job(dead).error or "")
    for job_id in (ok, dead):
        detail = api.job(job_id)
        assert detail["payload"]["secret"] == secret[job_id]
        assert detail["progress"] == {"note": secret[job_id]}
        if detail["engine"] == "dramatiq":
            assert detail["steps"]["echo"] == {"step saw": secret[job_id]}
    assert api.job(ok)["result"]["result"] == secret[ok]
    assert secret[dead] in api.job(dead)["error_message"]
    events = read_stream(api, ok)
    assert {"note": secret[ok]} in [e.get("progress") for e in events]
    dead_events = read_stream(api, dead)
    assert secret[dead] in (dead_events[-1].get("error") or "")


def test_dramatiq_jobs_leave_no_plaintext_in_redis_or_the_job_log(
    encrypted: None,
    engines: Engines,
    api: ApiServer,
    job_log_db: str,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    canary: str,
) -> None:
    on_engine(engines, monkeypatch, "dramatiq")
    secret: dict[str, str] = {}
    ok, dead, parked = (send(canary, secret, "dramatiq", **p) for p in JOBS)
    with get_engine(job_log_db).begin() as connection:  # the dispatch outbox
        outboxed = dispatch_job(
            "test.canary", {"secret": f"{canary}-outbox"}, connection=connection
        ).job_id
        secret[outboxed] = f"{canary}-outbox"
        kept = connection.execute(
            text("SELECT payload FROM dispatch_outbox WHERE job_id = :id"), {"id": outboxed}
        ).scalar_one()
        assert canary not in kept and crypto.is_sealed(json.loads(kept))
    for job_id in (ok, dead, outboxed):
        api.wait_for(job_id, lambda d: d["state"] in ENDED, engines=engines)
    api.wait_for(parked, lambda d: d.get("progress") is not None, engines=engines)
    wait_for(  # every job's last change shipped to the job log
        lambda: (
            api.job(outboxed).get("finished_at") is not None
            and api.job(dead).get("error_message") is not None
        ),
        timeout=30,
    )
    assert get_job(outboxed).result["result"] == secret[outboxed]

    client = redis_server.client()
    assert crypto.is_sealed(json.loads(client.hget(f"jobyard:job:{ok}", "result")))
    assert crypto.is_sealed(client.hget(f"jobyard:job:{dead}", "error").decode())
    client.close()
    with get_engine(job_log_db).connect() as connection:
        row = connection.execute(
            text("SELECT payload, result FROM job_log WHERE job_id = :id"), {"id": ok}
        ).one()
        assert crypto.is_sealed(row.payload) and crypto.is_sealed(row.result)
    assert_nowhere(canary, redis_server, job_log_db, engines)
    assert_read_back_intact(api, ok, dead, secret)
    assert api.job(parked)["payload"]["secret"] == secret[parked]


def assert_nowhere(
    canary: str, redis_server: RedisServer, database_url: str, engines: Engines
) -> None:
    """The canary is in no Redis key, nowhere in pg_dump and in no line the workers wrote."""
    assert redis_occurrences(redis_server, canary) == {}
    assert pg_dump_occurrences(database_url, canary) == 0
    assert canary not in all_output(engines)


def all_output(engines: Engines) -> str:
    """Every line the test's workers wrote (their logs), not only the tails `logs` shows."""
    return "".join(proc.output() for proc in engines._procs)


def temporal_history_occurrences(
    temporal: TemporalDevServer, job_ids: list[str], needle: str, *codec: str
) -> int:
    """Times `needle` appears in the histories of the workflows `job_ids`
    (`temporal workflow show --output json`; `codec`: its --codec-* options)."""
    found = 0
    for job_id in job_ids:
        shown = subprocess.run(
            [temporal_cli(), "workflow", "show", "--address", temporal.address,
             "--workflow-id", job_id, "--output", "json", *codec],
            capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        assert b"WorkflowExecutionStarted" in shown or b"workflowExecutionStarted" in shown
        found += shown.count(needle.encode()) + payload_data(json.loads(shown)).count(needle)
    return found


def payload_data(node: Any) -> str:
    """Every payload's data in a history as JSON shows it (base64), decoded."""
    if isinstance(node, dict):
        data = node.get("data") if isinstance(node.get("metadata"), dict) else None
        own = base64.b64decode(data).decode("utf-8", "replace") if isinstance(data, str) else ""
        return own + "".join(payload_data(value) for value in node.values())
    if isinstance(node, list):
        return "".join(payload_data(value) for value in node)
    return ""


def test_temporal_jobs_leave_no_plaintext_in_histories_redis_or_the_job_log(
    encrypted: None,
    engines: Engines,
    api: ApiServer,
    job_log_db: str,
    redis_server: RedisServer,
    temporal_server: TemporalDevServer,
    monkeypatch: pytest.MonkeyPatch,
    canary: str,
    admin_token: str,
) -> None:
    on_engine(engines, monkeypatch, "temporal")
    secret: dict[str, str] = {}
    ok, dead, parked = (send(canary, secret, "temporal", **p) for p in JOBS)
    monkeypatch.setenv(env.USE_DRAMATIQ, "true")  # no Dramatiq worker: moved to Temporal
    moved = send(canary, secret, "temporal")
    for job_id in (ok, dead, moved):
        api.wait_for(job_id, lambda d: d["state"] in ENDED, engines=engines)
    api.wait_for(parked, lambda d: d.get("progress") is not None, engines=engines)
    wait_for(
        lambda: all(api.job(j).get("finished_at") is not None for j in (ok, dead, moved)),
        timeout=30,
    )
    assert get_job(moved).result["result"] == secret[moved]
    assert get_job(moved).engine == "temporal"

    assert temporal_history_occurrences(temporal_server, list(secret), canary) == 0
    # Through the API's codec endpoint (admin token), Temporal's CLI shows them in plain.
    codec = ("--codec-endpoint", f"{api.url}/codec", "--codec-auth", f"Bearer {admin_token}")
    assert temporal_history_occurrences(temporal_server, [ok], secret[ok], *codec) > 0
    assert temporal_history_occurrences(temporal_server, [dead], secret[dead], *codec) > 0
    assert_nowhere(canary, redis_server, job_log_db, engines)
    assert_read_back_intact(api, ok, dead, secret)
    assert api.job(parked)["payload"]["secret"] == secret[parked]


def test_the_codec_endpoint_round_trips_and_names_a_missing_key(
    encrypted: None, api: ApiServer, admin_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = api.admin(admin_token)
    plain = {"payloads": [{"metadata": {"encoding": "anNvbi9wbGFpbg=="}, "data": "InNlY3JldCI="}]}
    encoded = api.client.post("/codec/encode", json=plain, headers=admin)
    assert encoded.status_code == 200, encoded.text
    sealed = encoded.json()["payloads"][0]
    assert sealed["metadata"]["encoding"] == "YmluYXJ5L2VuY3J5cHRlZA=="  # binary/encrypted
    decoded = api.client.post("/codec/decode", json=encoded.json(), headers=admin)
    assert decoded.status_code == 200, decoded.text
    assert decoded.json() == plain
    assert api.client.post("/codec/decode", json=plain, headers=admin).json() == plain
    monkeypatch.setenv(env.ENCRYPTION_KEYS, f"k2:{crypto.new_key()}")
    crypto.reset()
    missing = api.client.post("/codec/decode", json=encoded.json(), headers=admin)
    assert missing.status_code == 422 and "'k1'" in missing.json()["detail"]
    as_json = {**admin, "Content-Type": "application/json"}
    bad = api.client.post("/codec/decode", content=b"{nope", headers=as_json)
    assert bad.status_code == 400


def test_jobs_delayed_and_parked_across_a_rotation_finish_and_the_old_key_goes(
    encrypted: None,
    engines: Engines,
    api: ApiServer,
    job_log_db: str,
    monkeypatch: pytest.MonkeyPatch,
    canary: str,
) -> None:
    """Issue 33's rotation under load, scaled down: delayed and parked jobs sealed with k1, the
    workers restarted with k2 in front, `jobyard keys rotate` while they wait, then again once
    they finished; with k1 removed every job's log reads back: 0 failed for a key, 0 lost."""
    on_engine(engines, monkeypatch, "dramatiq")
    secret: dict[str, str] = {}
    delayed = [
        dispatch_job("test.canary", {"secret": f"{canary}-d{n}"}, delay=3).job_id
        for n in range(ROTATION_JOBS)
    ]
    secret.update({job_id: f"{canary}-d{n}" for n, job_id in enumerate(delayed)})
    parked = [send(canary, secret, "dramatiq", sleep=3) for _ in range(ROTATION_JOBS)]
    wait_for(lambda: all(get_job(j).progress is not None for j in parked), timeout=60)

    new_key = f"k2:{crypto.new_key()}"
    monkeypatch.setenv(env.ENCRYPTION_KEYS, f"{new_key},k1:{KEY}")  # k2 in front
    crypto.reset()
    assert engines.worker is not None
    engines.worker.stop()
    engines.start_worker()
    first = rotate(job_log_db, batch=7)
    assert first["job_log"] > 0

    for job_id in delayed + parked:
        api.wait_for(
            job_id, lambda d: d["state"] in ENDED and d.get("finished_at"), engines=engines
        )
    rotate(job_log_db)  # what the workers wrote with k1 before their restart, shipped since
    monkeypatch.setenv(env.ENCRYPTION_KEYS, new_key)  # k1 removed
    crypto.reset()
    for job_id in delayed + parked:
        record = get_job_record(job_id)
        assert record is not None and record.state == "succeeded", record
        assert record.payload["secret"] == secret[job_id]
        assert record.result == {"result": secret[job_id], "step saw": secret[job_id]}
        assert get_job(job_id).result == record.result  # Redis's record still holds k1 values
        assert api.job(job_id)["result"] == record.result
    with get_engine(job_log_db).connect() as connection:
        kept = connection.execute(text("SELECT payload::text, result::text FROM job_log")).all()
        steps = connection.execute(text("SELECT result FROM job_steps")).scalars().all()
    assert kept and not any("$jy1$k1$" in (v or "") for row in kept for v in row)
    assert steps and not any("$jy1$k1$" in value for value in steps)


def test_a_worker_without_the_payloads_key_fails_the_job_naming_it(
    encrypted: None,
    engines: Engines,
    api: ApiServer,
    monkeypatch: pytest.MonkeyPatch,
    canary: str,
) -> None:
    """Not a crash loop nor a job dropped: the job ends dead with an error naming the key, its
    payload kept sealed for a replay once the key is back."""
    only_k2 = f"k2:{crypto.new_key()}"
    monkeypatch.setenv(env.ENCRYPTION_KEYS, only_k2)
    on_engine(engines, monkeypatch, "dramatiq")  # the worker holds k2 alone
    monkeypatch.setenv(env.ENCRYPTION_KEYS, f"k1:{KEY},{only_k2}")  # this process seals with k1
    crypto.reset()
    job_id = dispatch_job("test.canary", {"secret": canary}).job_id
    detail = api.wait_for(
        job_id, lambda d: d["state"] in ENDED and d.get("finished_at"), engines=engines
    )  # in the job log too
    assert detail["state"] == "dead"
    assert "MissingEncryptionKeyError" in detail["error"] and "'k1'" in detail["error"]
    assert detail["payload"]["secret"] == canary  # kept, and readable with k1


def test_jobs_rescued_from_dramatiq_to_temporal_keep_no_plaintext(
    encrypted: None,
    engines: Engines,
    api: ApiServer,
    job_log_db: str,
    redis_server: RedisServer,
    temporal_server: TemporalDevServer,
    monkeypatch: pytest.MonkeyPatch,
    canary: str,
) -> None:
    """A job parked after a step and a delayed one, sealed in Redis, move to Temporal when
    their workers die (the rescue opens them for the workflow's codec): they finish there with
    the step's recorded result, and the canary stays out of every store."""
    monkeypatch.setenv("JOBYARD_RESCUE_INTERVAL", "0.5")
    on_engine(engines, monkeypatch, "dramatiq")
    secret: dict[str, str] = {}
    parked = send(canary, secret, "dramatiq", sleep=4)
    delayed = dispatch_job("test.canary", {"secret": f"{canary}-late"}, delay=3).job_id
    secret[delayed] = f"{canary}-late"
    wait_for(lambda: get_job(parked).progress is not None, timeout=30)
    assert engines.worker is not None
    engines.worker.signal_group(signal.SIGKILL)
    engines.worker.proc.wait()
    engines.start_temporal_worker()
    for job_id in (parked, delayed):
        detail = api.wait_for(
            job_id, lambda d: d["state"] in ENDED and d.get("finished_at"), engines=engines
        )
        assert (detail["state"], detail["engine"]) == ("succeeded", "temporal"), detail
        assert detail["result"] == {"result": secret[job_id], "step saw": secret[job_id]}

    assert temporal_history_occurrences(temporal_server, list(secret), canary) == 0
    assert_nowhere(canary, redis_server, job_log_db, engines)

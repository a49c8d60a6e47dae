"""`jobyard keys rotate` (jobyard.job_engine.db.rotation): a new key at the front, the job log
and sent events' bodies re-encrypted in batches (stopped half way and run again), the old key
removed: every value reads back intact, and a value still on a removed key names it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from jobyard.cli.main import build_parser, run_command
from jobyard.job_engine import crypto, env
from jobyard.job_engine.db import dispatch_outbox as outbox
from jobyard.job_engine.db import get_engine, sent_events
from jobyard.job_engine.db.joblog.sealed import opened
from jobyard.job_engine.db.joblog.writer import JobLogWriter
from jobyard.job_engine.db.migrate import upgrade
from jobyard.job_engine.db.models import DispatchOutbox, JobEvent, JobLog, JobStep, SentEvent
from jobyard.job_engine.db.rotation import BatchDone, rotate
from jobyard.job_engine.db.steps import StepJournal, load_steps

K1, K2 = f"k1:{crypto.new_key()}", f"k2:{crypto.new_key()}"
JOBS = [f"rot-{n:02d}" for n in range(7)]


def use(monkeypatch: pytest.MonkeyPatch, setting: str | None) -> None:
    if setting is None:
        monkeypatch.delenv(env.ENCRYPTION_KEYS, raising=False)
    else:
        monkeypatch.setenv(env.ENCRYPTION_KEYS, setting)
    crypto.reset()


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'rotation.db'}"
    upgrade(url)
    monkeypatch.setenv(env.DATABASE_URL, url)  # where send_event stores an event
    yield url
    use(monkeypatch, None)


def write_jobs(url: str, job_ids: list[str]) -> None:
    """What the engines write for a job: its row and events, a step, an outbox row."""
    writer = JobLogWriter(url, interval=3600)
    for job_id in job_ids:
        writer.record(
            job_id, name="test.canary", queue="default", engine="dramatiq", state="queued",
            payload={"secret": job_id},
        )  # fmt: skip
        writer.record(job_id, name="test.canary", progress={"note": job_id})
        writer.record(
            job_id, name="test.canary", state="dead", error_class="ValueError",
            error_message=f"ValueError: {job_id}", error_traceback=f"Traceback: {job_id}",
        )  # fmt: skip
    writer.flush()
    journal = StepJournal(url)
    for job_id in job_ids:
        assert journal.save(job_id, "echo", json.dumps({"step saw": job_id}))
    with get_engine(url).begin() as connection:
        rows = [outbox.OutboxRow(j, "test.canary", "default", json.dumps({"o": j}), None, 1.0)
                for j in job_ids]  # fmt: skip
        outbox.insert(outbox.SqlAlchemyTarget(connection), rows)
    for job_id in job_ids:  # an event's body is sealed for its name, not a job
        sent_events.store(f"paid-{job_id}", json.dumps({"paid by": job_id}), 1.0)


def key_ids(url: str) -> set[str | None]:
    """The key id of every value the database keeps sealed (None: one kept in plain)."""
    found: set[str | None] = set()
    with get_engine(url).connect() as connection:
        for row in connection.execute(select(JobLog.payload, JobLog.result, JobLog.error_message,
                                             JobLog.error_traceback, JobLog.progress)):  # fmt: skip
            found |= {crypto.key_id_of(v) for v in row if v is not None}
        for row in connection.execute(select(JobEvent.progress, JobEvent.error)):
            found |= {crypto.key_id_of(v) for v in row if v is not None}
        for (text,) in connection.execute(select(JobStep.result)):
            found.add(crypto.key_id_of(json.loads(text)))
        for (text,) in connection.execute(select(DispatchOutbox.payload)):
            found.add(crypto.key_id_of(json.loads(text)))
        for (text,) in connection.execute(select(SentEvent.data)):
            found.add(crypto.key_id_of(json.loads(text)))
    return found


def assert_intact(url: str) -> None:
    with get_engine(url).connect() as connection:
        for row in connection.execute(select(JobLog)):
            values = opened(row.job_id, dict(row._mapping))
            assert values["payload"] == {"secret": row.job_id}
            assert values["error_message"] == f"ValueError: {row.job_id}"
            assert values["error_traceback"] == f"Traceback: {row.job_id}"
            assert values["progress"] == {"note": row.job_id}
        events = connection.execute(select(JobEvent)).all()
        assert {crypto.unseal(e.job_id, e.error) for e in events if e.error} == {
            f"ValueError: {j}" for j in JOBS
        }
        outboxed = connection.execute(select(DispatchOutbox.job_id, DispatchOutbox.payload))
        for job_id, text in outboxed:
            assert json.loads(crypto.unseal_json(job_id, text)) == {"o": job_id}
    for job_id, steps in load_steps(JOBS, url=url).items():
        assert json.loads(crypto.unseal_json(job_id, steps["echo"])) == {"step saw": job_id}
    for job_id in JOBS:
        (event,) = sent_events.sent_between(f"paid-{job_id}", 0.0, 2.0)
        assert event.data == {"paid by": job_id}


class Interrupted(Exception):
    pass


def test_rotation_moves_every_value_to_the_new_key_resumably(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, None)
    write_jobs(url, JOBS[:2])  # before encryption was on: kept in plain
    use(monkeypatch, K1)
    write_jobs(url, JOBS[2:])
    assert key_ids(url) == {None, "k1"}

    use(monkeypatch, f"{K2},{K1}")  # a new key at the front: new writes use it, old ones read
    assert_intact(url)
    batches: list[BatchDone] = []

    def stop_after_two(done: BatchDone) -> None:
        batches.append(done)
        if len(batches) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        rotate(url, batch=3, on_batch=stop_after_two)
    assert key_ids(url) == {None, "k1", "k2"}  # half way
    resumed = rotate(url, batch=3, after={"job_log": batches[-1].last})
    assert key_ids(url) == {"k2"}
    assert resumed["job_log"] == len(JOBS) - 6  # the first two batches' rows stay done
    assert sum(resumed.values()) > 0
    assert rotate(url, batch=3) == dict.fromkeys(resumed, 0)  # nothing left: nothing written

    use(monkeypatch, K2)  # the old key removed
    assert_intact(url)


def test_a_value_on_a_removed_key_names_it(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, K1)
    write_jobs(url, JOBS[:1])
    use(monkeypatch, K2)
    with pytest.raises(crypto.MissingEncryptionKeyError, match="'k1'"):
        assert_intact(url)
    with pytest.raises(crypto.MissingEncryptionKeyError, match="'k1'"):
        rotate(url)


def test_the_cli_names_a_removed_key_without_a_traceback(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, K1)
    write_jobs(url, JOBS[:1])
    use(monkeypatch, K2)
    args = build_parser().parse_args(["keys", "rotate", "--url", url, "--no-redis"])
    assert run_command(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("jobyard: a value is encrypted with key 'k1'") and "Traceback" not in err


def test_the_cli_rotates_and_prints_one_line_per_batch(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, K1)
    write_jobs(url, JOBS)
    use(monkeypatch, f"{K2},{K1}")
    args = build_parser().parse_args(["keys", "rotate", "--url", url, "--batch", "4", "--no-redis"])
    assert run_command(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"table": "job_log", "read": 4, "rewritten": 4, "after": ["rot-03"]}
    assert lines[-1]["rotated"]["job_log"] == len(JOBS)
    assert key_ids(url) == {"k2"}
    resume = ["keys", "rotate", "--url", url, "--no-redis", "--after", 'job_log=["rot-05"]']
    assert run_command(build_parser().parse_args(resume)) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["read"] == 1  # rot-06 alone

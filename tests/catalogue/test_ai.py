"""`ai.generate` against a local server speaking Gemini's REST shape, with real databases."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from jobyard.job_engine import children, env
from jobyard.job_engine.db import session_scope
from jobyard.job_engine.db.models import ConversationMessage
from jobyard.job_engine.errors import InvalidPayloadError, MissingSettingError, PermanentError
from jobyard.job_engine.inline import run_inline
from jobyard.job_engine.jobs import ai
from jobyard.job_engine.registry import get_spec
from jobyard.job_engine.services.ai import limiter
from jobyard.job_engine.services.ai.gemini import GeminiRateLimitedError, GeminiRetryableError
from jobyard.job_engine.services.ai.models import AiUsageWindow
from tests.catalogue.peers import GeminiServer, InlineChildRunner, WebhookReceiver, free_port

API_KEY = "test-gemini-key"
WEBHOOK_SECRET = "test-webhook-secret"


@pytest.fixture
def gemini() -> Iterator[GeminiServer]:
    with GeminiServer(api_key=API_KEY) as server:
        yield server


@pytest.fixture
def gemini_env(gemini: GeminiServer, monkeypatch: pytest.MonkeyPatch) -> GeminiServer:
    """ai.generate pointed at the local Gemini; job retries without back-off (fast tests)."""
    for name in (
        env.GEMINI_RATE_LIMIT,
        env.GEMINI_RATE_PERIOD,
        env.GEMINI_DAILY_LIMIT,
        env.GEMINI_TIMEOUT,
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(env.GEMINI_API_KEY, API_KEY)
    monkeypatch.setenv(env.GEMINI_BASE_URL, gemini.url)
    monkeypatch.setenv(env.GEMINI_MODEL, "gemini-2.0-flash")
    monkeypatch.setenv("JOBYARD_JOB_AI_GENERATE_BACKOFF", "0")
    monkeypatch.setenv(env.WEBHOOK_SECRET, WEBHOOK_SECRET)
    return gemini


def payload(prompt: str = "Hello?", **extra: object) -> dict[str, object]:
    return {"prompt": prompt, "conversation_id": "conv-1", "user_id": "user-7", **extra}


def usage_rows() -> list[AiUsageWindow]:
    with session_scope() as session:
        return list(session.scalars(select(AiUsageWindow).order_by(AiUsageWindow.scope)))


def align_to_window(period: float, needed: float) -> float:
    """Sleep into a fresh rate window when fewer than `needed` seconds are left of this one;
    return the end of the window we are in."""
    left = period - time.time() % period
    if left < needed:
        time.sleep(left + 0.05)
    now = time.time()
    return now - now % period + period


# --- the whole path ------------------------------------------------------------------------------


def test_generate_sends_request_stores_reply_and_calls_back(
    gemini_env: GeminiServer, pg_database: str
) -> None:
    receiver = WebhookReceiver(WEBHOOK_SECRET).start()
    runner = InlineChildRunner()
    children.install_dispatcher(runner)
    try:
        result = run_inline(
            "ai.generate",
            payload(
                "What should I practise next?",
                context={
                    "previous_messages": [
                        {"role": "user", "content": "I scored 6/10 on fractions."},
                        {"role": "assistant", "content": "Good start! Which part was hard?"},
                    ],
                    "assessment_data": {"topic": "fractions", "score": 6},
                },
                options={"model": "gemini-1.5-pro", "temperature": 0.3, "max_tokens": 256},
                webhook_url=f"{receiver.url}/hooks/ai",
            ),
            job_id="job-ai-1",
        )
    finally:
        children.install_dispatcher(None)
        receiver.stop()

    # What the SDK really sent.
    assert gemini_env.count == 1
    sent = gemini_env.requests[0]
    assert sent.path == "/v1beta/models/gemini-1.5-pro:generateContent"
    assert sent.headers["x-goog-api-key"] == API_KEY
    assert sent.body["contents"] == [
        {"role": "user", "parts": [{"text": "I scored 6/10 on fractions."}]},
        {"role": "model", "parts": [{"text": "Good start! Which part was hard?"}]},
        {"role": "user", "parts": [{"text": "What should I practise next?"}]},
    ]
    assert sent.body["generationConfig"]["temperature"] == 0.3
    assert sent.body["generationConfig"]["maxOutputTokens"] == 256
    system = sent.body["systemInstruction"]["parts"][0]["text"]
    assert json.dumps({"score": 6, "topic": "fractions"}) in system

    reply = "Reply #1: What should I practise next?"
    assert result["reply"] == reply
    assert result["model"] == "gemini-1.5-pro"
    assert result["usage"]["total_tokens"] > 0

    # Stored in PostgreSQL.
    with session_scope() as session:
        rows = session.scalars(select(ConversationMessage)).all()
    assert [(r.conversation_id, r.user_id, r.role, r.content, r.model, r.job_id) for r in rows] == [
        ("conv-1", "user-7", "assistant", reply, "gemini-1.5-pro", "job-ai-1")
    ]
    assert result["message_id"] == rows[0].id

    # The callback: one webhook.deliver child, id derived from ours, really delivered and signed.
    assert runner.calls == [
        {
            "name": "webhook.deliver",
            "payload": {
                "url": f"{receiver.url}/hooks/ai",
                "body": {
                    "event": "ai.generate.completed",
                    "job_id": "job-ai-1",
                    **{
                        k: result[k]
                        for k in (
                            "conversation_id",
                            "message_id",
                            "reply",
                            "model",
                            "finish_reason",
                            "usage",
                        )
                    },
                },
            },
            "job_id": "job-ai-1:webhook",
        }
    ]
    assert result["webhook_job_id"] == "job-ai-1:webhook"
    assert runner.errors == {}
    assert runner.results["job-ai-1:webhook"] == {"status": 200}
    [delivery] = receiver.deliveries
    assert delivery.verified
    assert delivery.path == "/hooks/ai"
    assert delivery.headers["Idempotency-Key"] == "job-ai-1:webhook"
    assert delivery.json["reply"] == reply
    assert delivery.json["message_id"] == rows[0].id

    # The call was counted in the shared limiter (day + rate window), tokens included.
    counts = {row.scope: row.calls for row in usage_rows()}
    assert counts == {"gemini:60s": 1, "gemini:day": 1}
    day = next(r for r in usage_rows() if r.scope == "gemini:day")
    assert day.prompt_tokens > 0 and day.output_tokens > 0


def test_default_model_comes_from_env_and_no_webhook_means_no_child(
    gemini_env: GeminiServer,
    database: str,
    child_dispatches: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(env.GEMINI_MODEL, "gemini-2.0-flash-lite")
    result = run_inline("ai.generate", payload("Hi"), job_id="job-ai-2")
    [sent] = gemini_env.requests
    assert sent.model == "gemini-2.0-flash-lite"
    assert "generationConfig" not in sent.body or "temperature" not in sent.body["generationConfig"]
    assert sent.body["contents"] == [{"role": "user", "parts": [{"text": "Hi"}]}]
    assert "webhook_job_id" not in result
    assert child_dispatches.calls == []  # type: ignore[attr-defined]
    with session_scope() as session:
        stored = session.scalars(select(ConversationMessage)).one()
    assert (stored.content, stored.model, stored.job_id) == (
        "Reply #1: Hi",
        "gemini-2.0-flash-lite",
        "job-ai-2",
    )


def test_store_step_is_idempotent_per_job(database: str) -> None:
    first = ai.store_reply("job-x", "conv-9", None, "the reply", "gemini-2.0-flash")
    again = ai.store_reply("job-x", "conv-9", None, "the reply", "gemini-2.0-flash")
    other = ai.store_reply("job-y", "conv-9", None, "another reply", "gemini-2.0-flash")
    assert first["created"] is True
    assert again == {"message_id": first["message_id"], "created": False}
    assert other["message_id"] != first["message_id"]
    with session_scope() as session:
        assert len(session.scalars(select(ConversationMessage)).all()) == 2


# --- limits --------------------------------------------------------------------------------------


def test_sixty_first_call_in_a_minute_is_never_sent(
    gemini_env: GeminiServer, pg_database: str
) -> None:
    # 60 calls plus the deferral must fit in one window: start with >= 30 s of it left.
    window_end = align_to_window(60, needed=30)
    for number in range(60):
        run_inline("ai.generate", payload(f"question {number}"))
    assert gemini_env.count == 60
    with pytest.raises(GeminiRateLimitedError, match="rate limit reached") as refused:
        run_inline("ai.generate", payload("question 60"))
    assert time.time() < window_end, "the calls took too long for this test to mean anything"
    assert refused.value.retry_after > ai.MAX_RATE_WAIT
    assert gemini_env.count == 60  # never sent: not even by the step's retry
    counts = {row.scope: row.calls for row in usage_rows()}
    assert counts == {"gemini:60s": 60, "gemini:day": 60}
    with session_scope() as session:
        assert len(session.scalars(select(ConversationMessage)).all()) == 60


def test_full_window_waits_for_the_next_one(
    gemini_env: GeminiServer, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.GEMINI_RATE_LIMIT, "2")
    monkeypatch.setenv(env.GEMINI_RATE_PERIOD, "3")
    window_end = align_to_window(3, needed=2.5)
    run_inline("ai.generate", payload("one"))
    run_inline("ai.generate", payload("two"))
    result = run_inline("ai.generate", payload("three"))  # waits for the next window
    assert result["reply"] == "Reply #3: three"
    times = [r.received_at for r in gemini_env.requests]
    assert len(times) == 3
    assert times[0] < window_end and times[1] < window_end
    assert times[2] >= window_end
    calls = sorted((r.window_start, r.calls) for r in usage_rows() if r.scope == "gemini:3s")
    assert [c for _, c in calls] == [2, 1]


def test_exhausted_daily_quota_fails_with_a_clear_reason(
    gemini_env: GeminiServer, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.GEMINI_DAILY_LIMIT, "3")
    for number in range(3):
        run_inline("ai.generate", payload(f"q{number}"))
    started = time.monotonic()
    with pytest.raises(PermanentError, match="Gemini daily quota exhausted: 3 calls") as failed:
        run_inline("ai.generate", payload("one too many"))
    assert time.monotonic() - started < 5  # it fails, it does not spin
    assert "GEMINI_DAILY_LIMIT=3" in str(failed.value)
    assert "resets at 00:00 UTC" in str(failed.value)
    assert gemini_env.count == 3
    counts = {row.scope: row.calls for row in usage_rows()}
    assert counts["gemini:day"] == 3


def test_limiter_is_atomic_under_concurrency(database: str) -> None:
    now = 1_700_000_000.0  # a fixed instant: every thread sees the same windows
    granted: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        for _ in range(3):
            got = limiter.reserve(
                "test", rate_limit=7, rate_period=60, daily_limit=100, now=now
            ).granted
            with lock:
                granted.append(got)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 48
    assert granted.count(True) == 7
    counts = {row.scope: row.calls for row in usage_rows()}
    assert counts == {"test:60s": 7, "test:day": 7}  # refused calls rolled back the day count

    # The next window opens again; the day keeps counting.
    later = limiter.reserve("test", rate_limit=7, rate_period=60, daily_limit=100, now=now + 60)
    assert later.granted and later.window_calls == 1 and later.day_calls == 8


# --- errors at the boundary ----------------------------------------------------------------------


def test_missing_api_key_fails_at_check_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_spec("ai.generate")
    monkeypatch.delenv(env.GEMINI_API_KEY, raising=False)
    with pytest.raises(MissingSettingError, match="GEMINI_API_KEY"):
        spec.check_environment()
    monkeypatch.setenv(env.GEMINI_API_KEY, "x")
    spec.check_environment()


def test_declaration() -> None:
    spec = get_spec("ai.generate")
    assert (spec.queue, spec.timeout, spec.retry.attempts) == ("default", 30.0, 2)
    assert spec.requires_env == (env.GEMINI_API_KEY,)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"options": {"model": "../../admin"}}, "options.model"),
        ({"options": {"temperature": 5}}, "options.temperature"),
        ({"options": {"max_tokens": 0}}, "options.max_tokens"),
        ({"context": {"previous_messages": [{"role": "system", "content": "x"}]}}, "role"),
        ({"webhook_url": "not a url"}, "webhook_url"),
        ({"conversation_id": None}, "conversation_id"),
    ],
)
def test_bad_payload_is_refused_at_dispatch(bad: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidPayloadError, match=field):
        get_spec("ai.generate").validate({**payload(), **bad})


def test_server_errors_are_retried_then_succeed(gemini_env: GeminiServer, database: str) -> None:
    gemini_env.script(503, message="The model is overloaded. Please try again later.")
    result = run_inline("ai.generate", payload("again?"))
    assert gemini_env.count == 2
    assert result["reply"] == "Reply #2: again?"


def test_persistent_429_fails_as_retryable(gemini_env: GeminiServer, database: str) -> None:
    gemini_env.script(429, message="Resource has been exhausted (e.g. check quota).")
    gemini_env.script(429, message="Resource has been exhausted (e.g. check quota).")
    with pytest.raises(GeminiRetryableError, match="429"):
        run_inline("ai.generate", payload())
    assert gemini_env.count == 2  # attempts=2
    with session_scope() as session:
        assert session.scalars(select(ConversationMessage)).all() == []


def test_client_errors_fail_at_once(
    gemini_env: GeminiServer, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.GEMINI_API_KEY, "wrong-key")
    with pytest.raises(PermanentError, match=r"400 INVALID_ARGUMENT.*API key not valid"):
        run_inline("ai.generate", payload())
    assert gemini_env.count == 1  # not retried

    monkeypatch.setenv(env.GEMINI_API_KEY, API_KEY)
    gemini_env.script(404, message="models/nope is not found for API version v1beta")
    with pytest.raises(PermanentError, match="404 NOT_FOUND"):
        run_inline("ai.generate", payload(options={"model": "nope"}))
    assert gemini_env.count == 2


def test_unreachable_gemini_is_retryable(
    gemini_env: GeminiServer, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.GEMINI_BASE_URL, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(GeminiRetryableError, match="cannot reach Gemini"):
        run_inline("ai.generate", payload())


def test_slow_gemini_times_out_as_retryable(
    gemini_env: GeminiServer, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.GEMINI_TIMEOUT, "0.5")
    gemini_env.delay = 2.0
    started = time.monotonic()
    with pytest.raises(GeminiRetryableError, match="timed out"):
        run_inline("ai.generate", payload())
    assert time.monotonic() - started < 4  # two attempts of 0.5 s, not two of 2 s
    assert gemini_env.count == 2


# --- on the real engines (tests/engines.py: worker subprocesses, private Redis, Temporal) --------


def wait_until(predicate: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_ai_generate_on_both_engines(
    engines: object, engine: str, gemini_env: GeminiServer, pg_database: str
) -> None:
    with WebhookReceiver(WEBHOOK_SECRET) as receiver:
        status = engines.run(  # type: ignore[attr-defined]
            engine,
            "ai.generate",
            payload(
                "On an engine?",
                context={"previous_messages": [{"role": "user", "content": "Earlier"}]},
                options={"temperature": 0.1},
                webhook_url=f"{receiver.url}/cb",
            ),
        )
        assert status.state == "succeeded", status
        assert status.engine == engine
        wait_until(lambda: len(receiver.deliveries) >= 1)
        [delivery] = receiver.deliveries
    reply = "Reply #1: On an engine?"
    assert status.result["reply"] == reply
    assert status.result["webhook_job_id"] == f"{status.job_id}:webhook"
    [sent] = gemini_env.requests
    assert sent.path == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert [c["role"] for c in sent.body["contents"]] == ["user", "user"]
    assert sent.body["generationConfig"]["temperature"] == 0.1
    with session_scope() as session:
        stored = session.scalars(select(ConversationMessage)).one()
    assert (stored.job_id, stored.content) == (status.job_id, reply)
    assert delivery.verified
    assert delivery.headers["Idempotency-Key"] == f"{status.job_id}:webhook"
    assert delivery.json["message_id"] == stored.id


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_ai_generate_quota_failure_on_both_engines(
    engines: object,
    engine: str,
    gemini_env: GeminiServer,
    pg_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(env.GEMINI_DAILY_LIMIT, "0")
    status = engines.run(engine, "ai.generate", payload())  # type: ignore[attr-defined]
    assert status.state == "failed", status
    assert "Gemini daily quota exhausted" in (status.error or "")
    assert status.attempts == 1  # permanent: not retried
    assert gemini_env.count == 0


# --- the 0002_ai_usage migration -----------------------------------------------------------------


def test_migration_matches_the_model_and_downgrades(database: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    from jobyard.job_engine.db import Base, get_engine, migrate

    def ours(obj, name, type_, reflected, compare_to) -> bool:  # type: ignore[no-untyped-def]
        table = obj if type_ == "table" else getattr(obj, "table", None)
        return getattr(table, "name", name) == "ai_usage_windows"

    engine = get_engine(database)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_object": ours, "compare_type": True}
        )
        assert compare_metadata(context, Base.metadata) == []
    assert inspect(engine).get_pk_constraint("ai_usage_windows")["constrained_columns"] == [
        "scope",
        "window_start",
    ]
    try:
        migrate.downgrade(database, "0001_initial")
        assert "ai_usage_windows" not in inspect(engine).get_table_names()
    finally:
        migrate.upgrade(database)
    assert "ai_usage_windows" in inspect(engine).get_table_names()

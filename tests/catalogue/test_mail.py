"""`email.send` against a real SMTP server (aiosmtpd) on a free local port."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from jobyard.job_engine import children, env
from jobyard.job_engine.errors import InvalidPayloadError, MissingSettingError, PermanentError
from jobyard.job_engine.inline import run_inline
from jobyard.job_engine.jobs import mail
from jobyard.job_engine.jobs.mail import EmailRetryableError
from jobyard.job_engine.registry import get_spec
from tests.catalogue.peers import InlineChildRunner, SmtpSink, free_port

SENDER = "Jobyard <no-reply@jobyard.test>"


@pytest.fixture
def smtp(monkeypatch: pytest.MonkeyPatch) -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        point_at(monkeypatch, sink)
        yield sink


def point_at(monkeypatch: pytest.MonkeyPatch, sink: SmtpSink) -> None:
    for name in (env.SMTP_USERNAME, env.SMTP_PASSWORD, env.SMTP_STARTTLS, env.SMTP_TIMEOUT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(env.SMTP_HOST, "127.0.0.1")
    monkeypatch.setenv(env.SMTP_PORT, str(sink.port))
    monkeypatch.setenv(env.SMTP_FROM, SENDER)
    monkeypatch.setenv("JOBYARD_JOB_EMAIL_SEND_BACKOFF", "0")  # retries without waiting


def body(message: object, kind: str) -> str:
    """The text of the `kind` (plain/html) part, with SMTP's CRLF line ends made LF."""
    return message.get_body((kind,)).get_content().replace("\r\n", "\n")  # type: ignore[attr-defined]


def welcome(to: str | list[str] = "Ann Example <ann@example.test>") -> dict[str, object]:
    return {
        "to": to,
        "subject": "Welcome aboard",
        "template": "welcome",
        "context": {"name": "Ann <b>", "login_url": "https://app.example.test/login"},
    }


def test_welcome_email_is_rendered_and_sent(smtp: SmtpSink) -> None:
    result = run_inline("email.send", welcome(), job_id="job-mail-1")
    [received] = smtp.messages
    assert received.mail_from == "no-reply@jobyard.test"
    assert received.rcpt_tos == ["ann@example.test"]
    message = received.message
    assert message["From"] == SENDER
    assert message["To"] == "Ann Example <ann@example.test>"
    assert message["Subject"] == "Welcome aboard"
    assert message["Message-ID"] == mail.message_id_for("job-mail-1", SENDER)
    assert message["Message-ID"].endswith("@jobyard.test>")
    assert message["X-Jobyard-Job-Id"] == "job-mail-1"
    assert message["Date"]
    text, html = body(message, "plain"), body(message, "html")
    assert "Hello Ann <b>," in text
    assert "Sign in here: https://app.example.test/login" in text
    assert "Hello Ann &lt;b&gt;," in html  # autoescaped in HTML only
    assert '<a href="https://app.example.test/login">' in html
    assert result == {"message_id": message["Message-ID"], "to": "ann@example.test"}


def test_report_and_plain_templates(smtp: SmtpSink) -> None:
    report = {
        "kind": "daily",
        "period_start": "2025-01-01",
        "period_end": "2025-01-02",
        "total": {"count": 12, "avg_ms": 40.5, "p50_ms": 30.0, "p95_ms": 90.0, "max_ms": 120},
        "by_state": [
            {"state": "succeeded", "count": 11, "avg_ms": 35.0},
            {"state": "failed", "count": 1, "avg_ms": None},
        ],
        "by_engine": [],
        "note": "<script>alert(1)</script>",
    }
    run_inline(
        "email.send",
        {
            "to": "ops@example.test",
            "subject": "Daily",
            "template": "report",
            "context": {"report": report},
        },
    )
    run_inline(
        "email.send",
        {
            "to": "ops@example.test",
            "subject": "Plain",
            "template": "plain",
            "context": {"body": "Line one\nLine two <ok>"},
        },
    )
    report_mail, plain_mail = (m.message for m in smtp.messages)
    text = body(report_mail, "plain")
    assert "jobyard daily report" in text
    assert "Period: 2025-01-01 to 2025-01-02" in text
    assert "Total: count=12, avg_ms=40.5, p50_ms=30.0, p95_ms=90.0, max_ms=120" in text
    assert "  - state=succeeded, count=11, avg_ms=35.0" in text
    assert "  - state=failed, count=1, avg_ms=-" in text
    assert "By engine:\n  (none)" in text
    html = body(report_mail, "html")
    assert "<td>succeeded</td><td>11</td><td>35.0</td>" in html
    assert "&lt;script&gt;" in html and "<script>" not in html

    assert plain_mail.get_content_type() == "text/plain"  # no HTML template: no HTML part
    assert body(plain_mail, "plain") == "Line one\nLine two <ok>\n"


def test_a_retried_send_keeps_its_message_id(smtp: SmtpSink) -> None:
    # The server keeps the first copy but answers 451: the step is retried and sends again.
    smtp.fail_next_data = 1
    result = run_inline("email.send", welcome(), job_id="job-mail-retry")
    first, second = smtp.messages
    assert first.message["Message-ID"] == second.message["Message-ID"] == result["message_id"]
    assert result["message_id"] == mail.message_id_for("job-mail-retry", SENDER)
    # Another job: another Message-ID.
    run_inline("email.send", welcome(), job_id="job-mail-other")
    assert smtp.messages[2].message["Message-ID"] != result["message_id"]


def test_bulk_becomes_one_child_per_recipient(smtp: SmtpSink) -> None:
    runner = InlineChildRunner()
    children.install_dispatcher(runner)
    try:
        result = run_inline(
            "email.send",
            welcome(["a@example.test", "Bea <b@example.test>", "A@EXAMPLE.test"]),
            job_id="job-bulk",
        )
    finally:
        children.install_dispatcher(None)
    assert result == {"children": ["job-bulk:to-0", "job-bulk:to-1"]}
    assert [(c["name"], c["job_id"], c["payload"]["to"]) for c in runner.calls] == [
        ("email.send", "job-bulk:to-0", "a@example.test"),
        ("email.send", "job-bulk:to-1", "Bea <b@example.test>"),
    ]
    assert runner.errors == {}
    assert sorted(tuple(m.rcpt_tos) for m in smtp.messages) == [
        ("a@example.test",),
        ("b@example.test",),
    ]
    ids = {m.message["To"]: m.message["Message-ID"] for m in smtp.messages}
    assert ids == {
        "a@example.test": mail.message_id_for("job-bulk:to-0", SENDER),
        "Bea <b@example.test>": mail.message_id_for("job-bulk:to-1", SENDER),
    }


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_login_when_credentials_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    with SmtpSink(credentials=("mailer", "s3cret")) as sink:
        point_at(monkeypatch, sink)
        monkeypatch.setenv(env.SMTP_USERNAME, "mailer")
        monkeypatch.setenv(env.SMTP_PASSWORD, "s3cret")
        run_inline("email.send", welcome())
        assert [m.login for m in sink.messages] == ["mailer"]

        monkeypatch.setenv(env.SMTP_PASSWORD, "wrong")
        with pytest.raises(PermanentError, match="refused the login"):
            run_inline("email.send", welcome())
        assert len(sink.messages) == 1


def test_refused_recipient_fails_at_once(smtp: SmtpSink) -> None:
    smtp.rejected_domains.add("nowhere.test")
    with pytest.raises(PermanentError, match="550"):
        run_inline("email.send", welcome("x@nowhere.test"))
    assert smtp.rcpt_attempts == ["x@nowhere.test"]  # not retried
    assert smtp.messages == []


def test_unreachable_server_is_retried_then_fails(
    smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.SMTP_PORT, str(free_port()))
    with pytest.raises(EmailRetryableError, match="ConnectionRefusedError"):
        run_inline("email.send", welcome())


def test_missing_settings_fail_at_check_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_spec("email.send")
    monkeypatch.delenv(env.SMTP_HOST, raising=False)
    monkeypatch.delenv(env.SMTP_FROM, raising=False)
    with pytest.raises(MissingSettingError, match="SMTP_HOST, SMTP_FROM"):
        spec.check_environment()
    assert (spec.queue, spec.timeout, spec.retry.attempts, spec.retry.backoff) == (
        "default",
        30.0,
        5,
        10.0,
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"template": "nope"}, r"unknown template 'nope' \(known: plain, report, welcome\)"),
        ({"template": "_report_macros"}, "unknown template"),
        ({"template": "../templates/email/plain"}, "unknown template"),
        ({"template": "plain", "context": {}}, r"template 'plain' needs context\.body: Field req"),
        ({"template": "report", "context": {"report": "text"}}, r"context\.report"),
        ({"to": "not-an-address"}, "not an email address"),
        ({"to": "a@example.test, b@example.test"}, "more than one address"),
        ({"to": []}, "no recipients"),
        ({"to": "a@example.test\r\nBcc: evil@example.test"}, "not an email address"),
        ({"subject": "Hi\r\nBcc: evil@example.test"}, "one line"),
    ],
)
def test_bad_payload_is_refused_at_dispatch(change: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidPayloadError, match=reason):
        get_spec("email.send").validate({**welcome(), **change})


# --- on the real engines (tests/engines.py: worker subprocesses, private Redis, Temporal) --------


def wait_until(predicate: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_email_send_on_both_engines(engines: object, engine: str, smtp: SmtpSink) -> None:
    smtp.fail_next_data = 1  # the first copy is kept but refused with 451: the job retries
    status = engines.run(engine, "email.send", welcome())  # type: ignore[attr-defined]
    assert status.state == "succeeded", status
    assert status.engine == engine
    expected = mail.message_id_for(status.job_id, SENDER)
    assert status.result == {"message_id": expected, "to": "ann@example.test"}
    assert [m.message["Message-ID"] for m in smtp.messages] == [expected, expected]
    assert "Hello Ann <b>," in body(smtp.messages[-1].message, "plain")


@pytest.mark.parametrize("engine", ["dramatiq", "temporal"])
def test_bulk_email_on_both_engines(engines: object, engine: str, smtp: SmtpSink) -> None:
    status = engines.run(  # type: ignore[attr-defined]
        engine, "email.send", welcome(["a@example.test", "b@example.test"])
    )
    assert status.state == "succeeded", status
    children_ids = [f"{status.job_id}:to-0", f"{status.job_id}:to-1"]
    assert status.result == {"children": children_ids}
    for child in children_ids:
        assert engines.wait(child).state == "succeeded"  # type: ignore[attr-defined]
    wait_until(lambda: len(smtp.messages) >= 2)
    assert sorted((m.rcpt_tos[0], m.message["Message-ID"]) for m in smtp.messages) == [
        ("a@example.test", mail.message_id_for(children_ids[0], SENDER)),
        ("b@example.test", mail.message_id_for(children_ids[1], SENDER)),
    ]

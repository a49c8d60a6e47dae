"""`email.send`: a templated email over SMTP, one recipient per job.

Payload `{"to": str | list[str], "subject": str, "template": str, "context": dict}`.

* One address: render `templates/email/<template>.txt.j2` (and `.html.j2` when present) and send
  it over SMTP (`SMTP_HOST`, `SMTP_PORT`, `SMTP_STARTTLS`, `SMTP_USERNAME`, `SMTP_PASSWORD`,
  `SMTP_FROM`). The Message-ID is derived from the job id, so a retried send carries the same
  Message-ID and a receiver can recognise the duplicate.
* A list of addresses (bulk): one `email.send` child job per distinct recipient, with ids derived
  from this job's id; the job returns the children's ids.

Unknown templates, bad addresses, header injection and a context missing what the template needs
are refused at dispatch (pydantic validation).
"""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, parseaddr
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from jobyard.job_engine import env
from jobyard.job_engine.children import dispatch_children
from jobyard.job_engine.context import JobContext
from jobyard.job_engine.errors import PermanentError
from jobyard.job_engine.policy import RetryPolicy
from jobyard.job_engine.registry import job

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates" / "email"
TIMEOUT_SECONDS = 30.0
MAX_RECIPIENTS = 1000
JOB_ID_HEADER = "X-Jobyard-Job-Id"


# --- templates ---------------------------------------------------------------------------------


class WelcomeContext(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    app_name: str = "jobyard"
    login_url: str | None = None


class ReportContext(BaseModel):
    model_config = ConfigDict(extra="allow")
    report: dict[str, Any]


class PlainContext(BaseModel):
    model_config = ConfigDict(extra="allow")
    body: str


# What each built-in template needs; a template without an entry takes any context.
TEMPLATE_CONTEXTS: dict[str, type[BaseModel]] = {
    "welcome": WelcomeContext,
    "report": ReportContext,
    "plain": PlainContext,
}


def available_templates() -> list[str]:
    """Names `x` of every `templates/email/x.txt.j2` shipped in the package."""
    return sorted(
        p.name.removesuffix(".txt.j2")
        for p in TEMPLATES_DIR.glob("*.txt.j2")
        if not p.name.startswith("_")
    )


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
        keep_trailing_newline=True,
    )


def render(template: str, context: dict[str, Any]) -> tuple[str, str | None]:
    """(text body, HTML body or None). Raises PermanentError when the template cannot render."""
    environment = _environment()
    try:
        text = environment.get_template(f"{template}.txt.j2").render(context)
        html = None
        if (TEMPLATES_DIR / f"{template}.html.j2").is_file():
            html = environment.get_template(f"{template}.html.j2").render(context)
    except jinja2.TemplateNotFound:
        raise PermanentError(
            f"unknown email template {template!r} (known: {', '.join(available_templates())})"
        ) from None
    except jinja2.TemplateError as exc:
        raise PermanentError(f"email template {template!r} failed to render: {exc}") from None
    return text, html


# --- payload -----------------------------------------------------------------------------------


def check_address(value: str) -> str:
    """One address, `a@b.example` or `Name <a@b.example>`; returned unchanged."""
    if not isinstance(value, str) or any(ch in value for ch in "\r\n\0"):
        raise ValueError(f"{value!r} is not an email address")
    parsed = getaddresses([value])
    if len(parsed) != 1:
        raise ValueError(f"{value!r} is more than one address; pass a list instead")
    _, address = parsed[0]
    local, at, domain = address.rpartition("@")
    if not at or not local or "." not in domain or any(ch.isspace() for ch in address):
        raise ValueError(f"{value!r} is not an email address")
    return value.strip()


def bare_address(value: str) -> str:
    return parseaddr(value)[1]


class EmailPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str | list[str]
    subject: str = Field(min_length=1, max_length=900)
    template: str
    context: dict[str, Any] = Field(default_factory=dict)

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            return check_address(value)
        if not value:
            raise ValueError("no recipients")
        if len(value) > MAX_RECIPIENTS:
            raise ValueError(f"{len(value)} recipients; at most {MAX_RECIPIENTS} per job")
        return [check_address(v) for v in value]

    @field_validator("subject")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(ch in value for ch in "\r\n\0"):
            raise ValueError("the subject must be one line")
        return value

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        known = available_templates()
        if value not in known:
            raise ValueError(f"unknown template {value!r} (known: {', '.join(known)})")
        return value

    @model_validator(mode="after")
    def _context_fits_template(self) -> EmailPayload:
        model = TEMPLATE_CONTEXTS.get(self.template)
        if model is not None:
            try:
                self.context = model.model_validate(self.context).model_dump(mode="json")
            except ValidationError as exc:
                problems = "; ".join(
                    f"context.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                    for e in exc.errors(include_url=False)
                )
                raise ValueError(f"template {self.template!r} needs {problems}") from None
        return self


# --- SMTP --------------------------------------------------------------------------------------


class EmailRetryableError(Exception):
    """A transient SMTP failure (4xx, connection lost, timeout): the send is retried."""


def _settings() -> dict[str, Any]:
    host, sender = env.get(env.SMTP_HOST), env.get(env.SMTP_FROM)
    missing = [n for n, v in ((env.SMTP_HOST, host), (env.SMTP_FROM, sender)) if not v]
    if missing:
        raise PermanentError(f"email.send cannot send: set {', '.join(missing)}")
    try:
        check_address(sender or "")
    except ValueError as exc:
        raise PermanentError(f"{env.SMTP_FROM}: {exc}") from None
    return {
        "host": host,
        "port": env.get_int(env.SMTP_PORT),
        "starttls": env.get_bool(env.SMTP_STARTTLS),
        "username": env.get(env.SMTP_USERNAME),
        "password": env.get(env.SMTP_PASSWORD) or "",
        "sender": sender,
        "timeout": env.get_float(env.SMTP_TIMEOUT),
    }


def message_id_for(job_id: str, sender: str) -> str:
    """`<jobyard.<sha256(job id)[:32]>@<sender's domain>>`: the same for every retry of a job."""
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:32]
    domain = bare_address(sender).rpartition("@")[2] or "jobyard.invalid"
    return f"<jobyard.{digest}@{domain}>"


def build_message(
    job_id: str, sender: str, to: str, subject: str, template: str, context: dict[str, Any]
) -> EmailMessage:
    text, html = render(template, context)
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id_for(job_id, sender)
    message[JOB_ID_HEADER] = job_id
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


def _classify(exc: BaseException, host: str, port: int) -> Exception:
    where = f"SMTP server {host}:{port}"
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return PermanentError(f"{where} refused the login ({exc.smtp_code} {exc.smtp_error!r})")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return PermanentError(f"{where}: {exc} (check {env.SMTP_STARTTLS} / {env.SMTP_USERNAME})")
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = {addr: code for addr, (code, _) in exc.recipients.items()}
        detail = "; ".join(f"{a}: {c} {m!r}" for a, (c, m) in exc.recipients.items())
        if all(code >= 500 for code in codes.values()):
            return PermanentError(f"{where} refused the recipient: {detail}")
        return EmailRetryableError(f"{where} deferred the recipient: {detail}")
    if isinstance(exc, smtplib.SMTPResponseException):
        detail = f"{where} answered {exc.smtp_code} {exc.smtp_error!r}"
        if exc.smtp_code >= 500:
            return PermanentError(detail)
        return EmailRetryableError(detail)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PermanentError(f"{where}: TLS certificate not trusted ({exc})")
    if isinstance(exc, smtplib.SMTPException | OSError):
        return EmailRetryableError(f"{where}: {type(exc).__name__}: {exc}")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


def _deliver(settings: dict[str, Any], message: EmailMessage, recipient: str) -> None:
    host, port = settings["host"], settings["port"]
    try:
        with smtplib.SMTP(host, port, timeout=settings["timeout"]) as smtp:
            smtp.ehlo()
            if settings["starttls"]:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if settings["username"]:
                smtp.login(settings["username"], settings["password"])
            smtp.send_message(
                message, from_addr=bare_address(settings["sender"]), to_addrs=[recipient]
            )
    except Exception as exc:
        raise _classify(exc, host, port) from exc


# --- steps -------------------------------------------------------------------------------------


async def send_email(
    job_id: str, to: str, subject: str, template: str, context: dict[str, Any]
) -> dict[str, Any]:
    """Step: render and send one email; returns its Message-ID and recipient."""
    settings = _settings()
    message = build_message(job_id, settings["sender"], to, subject, template, context)
    recipient = bare_address(to)
    await asyncio.to_thread(_deliver, settings, message, recipient)
    return {"message_id": message["Message-ID"], "to": recipient}


def unique_recipients(addresses: list[str]) -> list[str]:
    seen: set[str] = set()
    unique = []
    for address in addresses:
        key = bare_address(address).lower()
        if key not in seen:
            seen.add(key)
            unique.append(address)
    return unique


def dispatch_recipients(job_id: str, payload: dict[str, Any]) -> list[str]:
    """Step: one `email.send` child per recipient, ids `<job id>:to-<n>`; returns the ids.

    Idempotent: a repeated step dispatches the same ids, which the dispatcher starts once."""
    children = [
        ("email.send", {**payload, "to": address}, f"{job_id}:to-{number}")
        for number, address in enumerate(unique_recipients(payload["to"]))
    ]
    return [child["job_id"] for child in dispatch_children(children)]


# --- the job -----------------------------------------------------------------------------------


@job(
    "email.send",
    queue="default",
    payload=EmailPayload,
    retry=RetryPolicy(attempts=5, backoff=10.0),
    timeout=TIMEOUT_SECONDS,
    requires_env=(env.SMTP_HOST, env.SMTP_FROM),
)
async def send(ctx: JobContext, payload: EmailPayload) -> dict[str, Any]:
    """Send a templated email; a list of recipients becomes one child job per recipient."""
    if isinstance(payload.to, list):
        ids = await ctx.run(
            "dispatch", dispatch_recipients, ctx.job_id, payload.model_dump(mode="json")
        )
        return {"children": ids}
    # A step's result comes back as JSON (replayed on a resume), so ctx.run returns Any.
    result: dict[str, Any] = await ctx.run(
        "send",
        send_email,
        ctx.job_id,
        payload.to,
        payload.subject,
        payload.template,
        payload.context,
    )
    return result

"""Google Gemini through the `google-genai` SDK: settings, request building, error translation.

Everything here takes and returns JSON data, so that it can sit behind a job step.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import httpx

from jobyard.job_engine import env
from jobyard.job_engine.errors import PermanentError

_httpx2: ModuleType | None
try:  # the SDK may use httpx2, a drop-in fork of httpx, instead of httpx
    import httpx2 as _httpx2
except ImportError:  # pragma: no cover - depends on the google-genai version
    _httpx2 = None

_HTTP_MODULES = tuple(m for m in (httpx, _httpx2) if m is not None)
_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    *(m.TimeoutException for m in _HTTP_MODULES),
)
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    *(m.TransportError for m in _HTTP_MODULES),
)

RETRYABLE_STATUS = frozenset({408, 429})  # and every 5xx
# The REST version we speak: POST /v1beta/models/{model}:generateContent. Pinned, because the
# SDK's default moves (google-genai 3.x defaults to v1), and v1beta carries every field we use.
API_VERSION = "v1beta"


class GeminiRetryableError(Exception):
    """A transient failure (429, 5xx, timeout, network): the step is retried."""


class GeminiRateLimitedError(GeminiRetryableError):
    """Our own limiter has no call left in the current window: the call was not sent."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class GeminiSettings:
    api_key: str
    default_model: str
    base_url: str | None
    timeout: float
    rate_limit: int
    rate_period: float
    daily_limit: int

    @classmethod
    def from_env(cls) -> GeminiSettings:
        api_key = env.get(env.GEMINI_API_KEY)
        if not api_key:
            raise PermanentError(f"{env.GEMINI_API_KEY} is not set; ai.generate cannot call Gemini")
        return cls(
            api_key=api_key,
            default_model=env.get_str(env.GEMINI_MODEL),
            base_url=env.get(env.GEMINI_BASE_URL) or None,
            timeout=env.get_float(env.GEMINI_TIMEOUT),
            rate_limit=env.get_int(env.GEMINI_RATE_LIMIT),
            rate_period=env.get_float(env.GEMINI_RATE_PERIOD),
            daily_limit=env.get_int(env.GEMINI_DAILY_LIMIT),
        )


if TYPE_CHECKING:
    from google import genai

_clients: dict[tuple[str, str | None, float], genai.Client] = {}
_clients_lock = threading.Lock()


@functools.cache
def _sdk() -> ModuleType:
    """The google-genai SDK, imported on first use: it takes half a second to import, which
    every worker process would pay at start otherwise."""
    from google import genai

    return genai


def client_for(settings: GeminiSettings) -> genai.Client:
    """A synchronous client per (key, base URL, timeout), shared by threads (httpx is)."""
    sdk = _sdk()
    key = (settings.api_key, settings.base_url, settings.timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = sdk.Client(
                api_key=settings.api_key,
                http_options=sdk.types.HttpOptions(
                    base_url=settings.base_url,
                    api_version=API_VERSION,
                    timeout=int(settings.timeout * 1000),  # milliseconds
                    # One request per call: our limiter counts calls, the job retries them.
                    retry_options=sdk.types.HttpRetryOptions(attempts=1),
                ),
            )
    return client


def build_request(
    prompt: str,
    previous_messages: list[dict[str, str]],
    assessment_data: Any,
    temperature: float | None,
    max_tokens: int | None,
) -> dict[str, Any]:
    """The `contents` and `config` of a generateContent call, as JSON (the step's argument)."""
    contents: list[dict[str, Any]] = [
        {
            "role": "model" if message["role"] in ("assistant", "model") else "user",
            "parts": [{"text": message["content"]}],
        }
        for message in previous_messages
    ]
    contents.append({"role": "user", "parts": [{"text": prompt}]})
    config: dict[str, Any] = {}
    if temperature is not None:
        config["temperature"] = temperature
    if max_tokens is not None:
        config["max_output_tokens"] = max_tokens
    if assessment_data is not None:
        config["system_instruction"] = (
            "Use this assessment data as context for your answer (JSON):\n"
            + json.dumps(assessment_data, ensure_ascii=False, sort_keys=True)
        )
    return {"contents": contents, "config": config}


def _translate(exc: BaseException, model: str) -> Exception:
    if isinstance(exc, _sdk().errors.APIError):
        code = exc.code or 0
        detail = f"Gemini answered {code} {exc.status or ''} for model {model!r}: {exc.message}"
        if code in RETRYABLE_STATUS or code >= 500:
            return GeminiRetryableError(detail)
        return PermanentError(detail)
    if isinstance(exc, _TIMEOUT_ERRORS):
        return GeminiRetryableError(f"Gemini request timed out ({type(exc).__name__}: {exc})")
    if isinstance(exc, _NETWORK_ERRORS):
        return GeminiRetryableError(f"cannot reach Gemini ({type(exc).__name__}: {exc})")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


def generate_sync(settings: GeminiSettings, model: str, request: dict[str, Any]) -> dict[str, Any]:
    """One generateContent call. Returns {text, model, finish_reason, usage}; raises translated."""
    try:
        response = client_for(settings).models.generate_content(
            model=model,
            contents=request["contents"],
            config=_sdk().types.GenerateContentConfig(**request["config"]),
        )
    except Exception as exc:
        raise _translate(exc, model) from exc
    candidate = response.candidates[0] if response.candidates else None
    finish = str(candidate.finish_reason.value) if candidate and candidate.finish_reason else None
    text = response.text if candidate else None
    if not text:
        block = response.prompt_feedback.block_reason if response.prompt_feedback else None
        raise PermanentError(
            f"Gemini returned no text for model {model!r} "
            f"(finish_reason={finish}, block_reason={block})"
        )
    usage = response.usage_metadata
    return {
        "text": text,
        "model": response.model_version or model,
        "finish_reason": finish,
        "usage": {
            "prompt_tokens": (usage.prompt_token_count or 0) if usage else 0,
            "output_tokens": (usage.candidates_token_count or 0) if usage else 0,
            "total_tokens": (usage.total_token_count or 0) if usage else 0,
        },
    }


async def generate(settings: GeminiSettings, model: str, request: dict[str, Any]) -> dict[str, Any]:
    """`generate_sync` off the event loop (the SDK's sync client is pooled and thread-safe)."""
    return await asyncio.to_thread(generate_sync, settings, model, request)

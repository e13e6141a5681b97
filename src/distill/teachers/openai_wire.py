"""One chat request of the OpenAI-compatible teacher: its body, the body that came back, and what
a failure means.

Nothing here holds state: `request_kwargs` builds a request, `parse_body` checks a response body,
`classify` turns an exception into a verdict (`Retry`, `RateLimited`, `Fatal`, `Adapt`) and
`billed` reads the usage. The teacher (`openai_backend`) applies the verdicts: counters, replica
health, the shape of later requests.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import orjson

from distill.teachers.base import ErrorKind, Job
from distill.teachers.estimate import estimate_prompt_tokens
from distill.teachers.limits import parse_retry_after
from distill.teachers.replicas import Replica
from distill.teachers.responses import estimate_choice_tokens

_RETRYABLE_STATUS = {408, 409, 425}
_CLIENT_ERRORS: dict[int, ErrorKind] = {401: "auth", 403: "auth", 404: "not_found"}


class Retry(Exception):
    """A transport or server failure worth another attempt, blamed on the replica it hit."""

    def __init__(self, kind: ErrorKind, why: str, *, label: str, counter: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(why)
        self.kind: ErrorKind = kind
        self.why = why
        self.label = label
        """What the replica's health record says (`Replica.last_error`)."""
        self.counter = counter
        """The teacher counter this failure adds one to, if any."""
        self.retry_after = retry_after
        self.replica: Replica | None = None
        """Where it failed, so the next attempt can go elsewhere (set by the sender)."""


class RateLimited(Exception):
    """A 429: the account is busy, the replica is fine."""

    def __init__(self, why: str, retry_after: float | None) -> None:
        super().__init__(why)
        self.why = why
        self.retry_after = retry_after


class Fatal(Exception):
    """A failure retrying cannot fix (bad request). `global_` ones stop the whole run."""

    def __init__(self, kind: ErrorKind, why: str, *, global_: bool = False) -> None:
        super().__init__(why)
        self.kind: ErrorKind = kind
        self.why = why
        self.global_ = global_


class Adapt(Exception):
    """The server rejected a request shape we can change: resend with `change` applied."""

    def __init__(self, change: Literal["no_n", "max_completion_tokens"] | None = None) -> None:
        super().__init__(change or "")
        self.change = change


Failure = Retry | RateLimited | Fatal | Adapt


def request_kwargs(model: str, job: Job, batch: list[int], *, reseed: int,
                   max_tokens_field: str, extra_body: dict[str, Any]) -> dict[str, Any]:
    """The `chat.completions.create` arguments for samples `batch` of `job` (n = len(batch))."""
    params = job.params
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": job.messages,
        "temperature": params.temperature,
        "top_p": params.top_p,
        max_tokens_field: params.max_tokens,
        # Distinct seeds per sample: one-sample requests must not all return the same text.
        "seed": params.seed + batch[0] + 7919 * reseed,
    }
    if len(batch) > 1:
        kwargs["n"] = len(batch)
    if params.top_logprobs > 0:
        kwargs["logprobs"] = True
        kwargs["top_logprobs"] = params.top_logprobs
    if job.response_format is not None:
        kwargs["response_format"] = job.response_format
    if extra_body:
        kwargs["extra_body"] = extra_body
    return kwargs


def parse_body(content: bytes) -> dict[str, Any]:
    """The chat.completion in a 2xx body, or `Retry` when it holds none."""
    try:
        body = orjson.loads(content)
    except ValueError:
        raise Retry("malformed", f"malformed response: not JSON ({content[:80]!r})",
                    label="malformed JSON", counter="malformed") from None
    if not isinstance(body, dict):
        raise Retry("malformed", "malformed response: not a JSON object",
                    label="malformed JSON", counter="malformed")
    if "error" in body and not body.get("choices"):
        raise Retry("server", f"server error: {error_text(body)}", label="error body")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise Retry("empty", "empty response: no choices", label="no choices", counter="empty")
    return body


def classify(err: Exception, kwargs: dict[str, Any], *, timeout_s: float, solo: bool
             ) -> Failure:
    """What an SDK exception from one request means. `solo`: the only replica (a 401/403/404
    on one of several replicas is that replica's problem; on the only one, the run's)."""
    import openai

    if isinstance(err, openai.APITimeoutError):
        return Retry("timeout", f"timeout after {timeout_s:g}s", label="timeout",
                     counter="timeouts")
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__
        detail = f" ({type(cause).__name__})" if cause is not None else ""
        return Retry("connection", f"connection error{detail}", label="connection error",
                     counter="connection_errors")
    if not isinstance(err, openai.APIStatusError):
        return Retry("other", f"{type(err).__name__}: {err}", label=type(err).__name__)
    status, text = err.status_code, error_text(err.body) or str(err.message)
    why = f"HTTP {status}: {text}"[:300]
    if status == 429:
        if (err.code or "") == "insufficient_quota" or "quota" in (err.type or ""):
            return Fatal("quota", why, global_=True)
        return RateLimited(why, parse_retry_after(err.response.headers))
    if status >= 500 or status in _RETRYABLE_STATUS:
        # An overloaded server may say when to come back (503 + Retry-After).
        return Retry("server", why, label=f"HTTP {status}", counter="server_errors",
                     retry_after=parse_retry_after(err.response.headers))
    if status == 400 and kwargs.get("n", 1) > 1 and _about_n(err, text):
        return Adapt("no_n")  # requests already in flight with n > 1 land here too
    if status == 400 and "max_tokens" in kwargs and "max_completion_tokens" in text:
        return Adapt("max_completion_tokens")
    kind = status_kind(status)
    if status in (401, 403, 404) and not solo:
        return Retry(kind, why, label=f"HTTP {status}")
    return Fatal(kind, why, global_=status in (401, 404))


def status_kind(status: int) -> ErrorKind:
    """The kind of a 4xx the same request would get again."""
    return _CLIENT_ERRORS.get(status, "bad_request")


def billed(body: dict[str, Any], job: Job, prompt_ratio: float) -> tuple[int, int, float]:
    """(prompt tokens, completion tokens, the updated prompt-estimate ratio) of a response: the
    server's usage, else estimates. The ratio learns how far off the chars/4 guess is."""
    raw = body.get("usage")
    usage: dict[str, Any] = raw if isinstance(raw, dict) else {}
    est_prompt = estimate_prompt_tokens(job.messages)
    if isinstance(usage.get("prompt_tokens"), int):
        prompt = int(usage["prompt_tokens"])
        if est_prompt > 0:
            prompt_ratio = max(1.0, 0.9 * prompt_ratio + 0.1 * prompt / est_prompt)
    else:
        prompt = est_prompt
    if isinstance(usage.get("completion_tokens"), int):
        completion = int(usage["completion_tokens"])
    else:
        completion = sum(estimate_choice_tokens(c) for c in body.get("choices") or [])
    return prompt, completion, prompt_ratio


def error_text(body: Any) -> str:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner)[:240]
        return str(inner)[:240]
    return str(body)[:240] if body else ""


def _about_n(err: Any, text: str) -> bool:
    if getattr(err, "param", None) == "n":
        return True
    return bool(re.search(r"(^|[^\w])['\"`]?n['\"`]?\s*(>|must|should|=|is|not|only)", text))

"""Reading a chat.completion body: one choice into text, policy and soft targets.

Shared by the online client (`openai_backend`) and the Batch API (`batch`), so a response means
the same thing whichever way it arrived: the `finish_reason` policies (`on_length`,
`on_content_filter`), empty content, structured-output validation, and the served model name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from distill.config import TeacherConfig
from distill.teachers import structured
from distill.teachers.base import ErrorKind, Job, TopLogprobs
from distill.teachers.reasoning import normalize_message

Policy = Literal["keep", "drop", "retry"]

NO_LOGPROBS = ("teacher.top_logprobs: the server returned no logprobs (it ignores `logprobs` / "
               "`top_logprobs`), so these completions carry no soft targets")
"""The error of the samples not sent once a run that needs soft targets saw none (online and
Batch API alike; `error_kind` "missing_logprobs")."""


@dataclass
class Choice:
    """What one choice says, and what to do with it."""

    text: str
    reasoning: str | None
    finish_reason: str | None
    policy: Policy
    why: str | None
    """Why it is dropped or retried (None when kept)."""
    kind: ErrorKind | None = None
    """The kind of failure `why` is (None when kept)."""
    parsed: Any = None
    """The validated JSON value, when the job asks for a structured response."""
    top_logprobs: TopLogprobs | None = None

    @property
    def error(self) -> str:
        """The error of a dropped choice."""
        return f"dropped: finish_reason={self.why}"


def read_choice(cfg: TeacherConfig, job: Job, choice: dict[str, Any]) -> Choice:
    raw = choice.get("message")
    message: dict[str, Any] = raw if isinstance(raw, dict) else {}
    reasoning, text = normalize_message(message)
    finish = choice.get("finish_reason")
    finish = finish if isinstance(finish, str) else None
    policy: Policy = "keep"
    why: str | None = None
    kind: ErrorKind | None = None
    parsed: Any = None
    if finish == "length":
        policy, why, kind = cfg.on_length, f"length (max_tokens={job.params.max_tokens})", "length"
    elif finish == "content_filter":
        policy, why, kind = cfg.on_content_filter, "content_filter", "content_filter"
    elif not text.strip():
        policy, why, kind = "retry", "empty content", "empty"
    if job.response_format is not None and policy != "drop" and text.strip():
        parsed, invalid = structured.validate(text, job.response_format)
        if invalid is not None:
            # A truncated answer is never valid JSON: say so rather than "length".
            policy, kind = "retry", "invalid_output"
            why = invalid + (" (cut by max_tokens)" if finish == "length" else "")
        elif policy == "retry" and finish == "length":
            policy, why, kind = "keep", None, None  # complete, valid JSON that hit the limit
    if policy != "retry":
        kind = "dropped" if policy == "drop" else None
    lp = top_logprobs(choice) if job.params.top_logprobs > 0 else None
    return Choice(text=text, reasoning=reasoning, finish_reason=finish, policy=policy, why=why,
                  kind=kind, parsed=parsed, top_logprobs=lp)


def retry_note(read: Choice) -> str:
    """`last_error` for a content retry."""
    if read.kind in ("length", "content_filter"):
        return f"finish_reason={read.why}"
    return read.why or "empty content"


def served_model(body: dict[str, Any]) -> str | None:
    """The model the server says answered (`model` of the response), for provenance."""
    model = body.get("model")
    return model if isinstance(model, str) and model else None


def estimate_choice_tokens(choice: Any) -> int:
    if not isinstance(choice, dict):
        return 1
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
        return max(1, len(logprobs["content"]))
    message = choice.get("message")
    if not isinstance(message, dict):
        return 1
    chars = sum(len(v) for k in ("content", "reasoning_content", "reasoning")
                if isinstance(v := message.get(k), str))
    return max(1, chars // 4)


def split(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to `weights`; the parts add up to `total` exactly."""
    if not weights:
        return []
    w = [max(1, x) for x in weights]
    s = sum(w)
    parts = [total * x // s for x in w]
    for i in range(total - sum(parts)):
        parts[i % len(parts)] += 1
    return parts


def top_logprobs(choice: dict[str, Any]) -> TopLogprobs | None:
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    steps: TopLogprobs = []
    for tok in content:
        if not isinstance(tok, dict):
            continue
        top = tok.get("top_logprobs") or []
        pairs: list[tuple[int | str, float]] = [
            (str(t.get("token", "")), float(t.get("logprob", 0.0)))
            for t in top if isinstance(t, dict)
        ]
        if not pairs and "token" in tok:
            pairs = [(str(tok["token"]), float(tok.get("logprob", 0.0)))]
        steps.append(pairs)
    return steps

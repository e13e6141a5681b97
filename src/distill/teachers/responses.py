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
from distill.teachers.base import Job
from distill.teachers.reasoning import normalize_message

Policy = Literal["keep", "drop", "retry"]


@dataclass
class Choice:
    """What one choice says, and what to do with it."""

    text: str
    reasoning: str | None
    finish_reason: str | None
    policy: Policy
    why: str | None
    """Why it is dropped or retried (None when kept)."""
    parsed: Any = None
    """The validated JSON value, when the job asks for a structured response."""
    top_logprobs: list[list[tuple[int | str, float]]] | None = None


def read_choice(cfg: TeacherConfig, job: Job, choice: dict[str, Any]) -> Choice:
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    reasoning, text = normalize_message(message)
    finish = choice.get("finish_reason")
    finish = finish if isinstance(finish, str) else None
    policy: Policy = "keep"
    why: str | None = None
    parsed: Any = None
    if finish == "length":
        policy, why = cfg.on_length, f"length (max_tokens={job.params.max_tokens})"
    elif finish == "content_filter":
        policy, why = cfg.on_content_filter, "content_filter"
    elif not text.strip():
        policy, why = "retry", "empty content"
    if job.response_format is not None and policy != "drop" and text.strip():
        parsed, invalid = structured.validate(text, job.response_format)
        if invalid is not None:
            # A truncated answer is never valid JSON: say so rather than "length".
            policy, why = "retry", invalid + (" (cut by max_tokens)" if finish == "length" else "")
        elif policy == "retry" and finish == "length":
            policy, why = "keep", None  # complete, valid JSON that just hit the limit
    lp = top_logprobs(choice) if job.params.top_logprobs > 0 else None
    return Choice(text=text, reasoning=reasoning, finish_reason=finish, policy=policy, why=why,
                  parsed=parsed, top_logprobs=lp)


def retry_note(why: str | None) -> str:
    """`last_error` for a content retry."""
    if why is None or why == "empty content" or why.startswith(("invalid JSON", "schema")):
        return why or "empty content"
    return f"finish_reason={why}"


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
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
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


def top_logprobs(choice: dict[str, Any]) -> list[list[tuple[int | str, float]]] | None:
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    steps: list[list[tuple[int | str, float]]] = []
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

"""Bring-your-own generations (`generate.source`): a file of teacher answers made elsewhere.

Each row becomes a generation row (`records.make_generation_row`): what the file has is kept;
what it lacks is derived the way the generators derive it (id and seed id, the student's prompt
from `generate.prompt`, rationale and answer parsed from the response).
"""

from __future__ import annotations

from typing import Any

from distill.answers import parse_response
from distill.config import ConfigError, PipelineConfig
from distill.generate.templates import chat_messages
from distill.records import GenerationRow, make_generation_row
from distill.seeds import read_rows

_DERIVED = ("id", "seed_id", "sample", "question", "gold", "messages", "teacher")
"""Fields set from the file's values or derived (passed to the builder by name)."""
_PARSED = ("reasoning", "rationale", "answer")


def imported_generations(cfg: PipelineConfig) -> list[GenerationRow]:
    """Bring-your-own generations: fill the schema's derived fields, keep what the file has."""
    path = cfg.resolve(cfg.generate.source or "")
    prompt = cfg.resolve(cfg.generate.prompt)
    out = []
    for i, r in enumerate(read_rows(path, "generate.source")):
        for f in ("question", "response"):
            if not isinstance(r.get(f), str):
                raise ConfigError(f"{cfg.generate.source}: row {i + 1}: missing field {f!r}")
        seed_id = r.get("seed_id") or str(r.get("id", f"row-{i}")).split("#")[0]
        gold = r.get("gold")
        # The prompt evaluate will put to the student (same template, same system prompt): a
        # student trained on the bare question would be scored on another prompt.
        messages = r.get("messages") or chat_messages(prompt, cfg.generate.system_prompt,
                                                      question=r["question"])
        parsed: dict[str, Any] = {k: r.get(k) for k in _PARSED}
        if parsed["rationale"] is None or parsed["answer"] is None:
            found = parse_response(r["response"], r.get("reasoning"))
            parsed = {k: v if v is not None else found[k] for k, v in parsed.items()}
        fields = {k: v for k, v in r.items() if k not in _DERIVED and k not in _PARSED}
        out.append(make_generation_row(
            seed_id=seed_id, sample=int(r.get("sample") or 0), question=r["question"],
            gold=None if gold is None else str(gold), messages=messages,
            teacher=r.get("teacher") or f"file:{path.name}", parsed=parsed,
            row_id=str(r.get("id") or f"{seed_id}#{r.get('sample', 0)}"), **fields))
    return out

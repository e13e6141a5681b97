"""LLM-as-judge: a rubric prompt (`prompts/judge.j2`) scores each row through the teacher engine.

The judge is any teacher backend (`filter.judge.teacher`, default: the pipeline's teacher), run by
`engine.run_jobs` with the run's response cache, so a rerun re-judges nothing. Scores are parsed
robustly ("Score: 8/10", "8", "**8**", {"score": 8}, "rating: 4 out of 5") and rescaled onto
`scale`; rows whose call failed or whose reply holds no score are dropped with that reason.

`structured: true` asks for `{"score": number}` through a json_schema `response_format` (the
openai backend validates it on receipt and retries an invalid reply); the score is then read
from the parsed object, and from the text when the backend returns no parsed value.
"""

from __future__ import annotations

import json
import re
from typing import Any

from distill.answers import gold_answer, split_think
from distill.config import PipelineConfig
from distill.filter.rows import question_of, response_of
from distill.teachers import make_teacher, structured
from distill.teachers.base import Completion, Job, SamplingParams
from distill.teachers.cache import ResponseCache
from distill.teachers.engine import run_jobs

_N = r"(-?\d+(?:\.\d+)?)"
_OUT_OF = rf"\s*(?:/|out\s+of|of)\s*{_N}"
_LABELLED = re.compile(
    rf"(?:score|rating|grade)s?\b[^\d\n]{{0,20}}?{_N}(?:{_OUT_OF})?", re.I)
_FRACTION = re.compile(rf"{_N}\s*(?:/|out\s+of)\s*{_N}", re.I)
_BOLD = re.compile(rf"\*\*\s*{_N}(?:{_OUT_OF})?\s*\*\*", re.I)
_BARE = re.compile(rf"\s*{_N}(?:{_OUT_OF})?\s*\.?\s*", re.I)
_JSON_KEYS = ("score", "rating", "grade")
SCORE_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"score": {"type": "number"}},
                                "required": ["score"], "additionalProperties": False}
"""What `filter.judge.structured` asks the judge to answer in."""


def _scaled(value: str, denominator: str | None, scale: float) -> float | None:
    v = float(value)
    if denominator is not None:
        d = float(denominator)
        return v / d * scale if d > 0 and 0 <= v <= d else None
    return v if 0 <= v <= scale else None


def parse_judge_score(text: str | None, scale: float = 10.0) -> float | None:
    """The judge's score on [0, scale], or None when the reply holds none (or one out of range)."""
    if not text:
        return None
    _, visible = split_think(text)
    text = visible or text
    for m in reversed(list(re.finditer(r"\{[^{}]*\}", text))):
        try:
            data = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            continue
        for key, value in data.items():
            if str(key).lower() in _JSON_KEYS:
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return _scaled(str(value), None, scale)
                if isinstance(value, str):
                    return parse_judge_score(value, scale)
    for pattern in (_LABELLED, _BOLD):
        matches = list(pattern.finditer(text))
        if matches:  # the verdict comes last: judges restate the rubric before it
            return _scaled(matches[-1].group(1), matches[-1].group(2), scale)
    bare = _BARE.fullmatch(text.strip())
    if bare:
        return _scaled(bare.group(1), bare.group(2), scale)
    fractions = list(_FRACTION.finditer(text))
    if fractions:
        return _scaled(fractions[-1].group(1), fractions[-1].group(2), scale)
    return None


def structured_score(comp: Completion, scale: float) -> float | None:
    """The score of a structured reply: the parsed `{"score": n}` when the backend returns
    one (on [0, scale], else None), otherwise whatever `parse_judge_score` finds in the text."""
    parsed = comp.extra.get("parsed") if comp.extra else None
    if isinstance(parsed, dict):
        value = parsed.get("score")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _scaled(str(value), None, scale)
    return parse_judge_score(comp.text, scale)


def judge_messages(row: dict[str, Any], template: str,
                   json_scale: float | None = None) -> list[dict[str, str]]:
    """The rubric prompt for `row`; `json_scale`: also ask for the score as JSON on that scale
    (`filter.judge.structured`)."""
    from distill.generate.templates import render

    prompt = render(template, field="filter.judge.prompt", question=question_of(row),
                    response=response_of(row), gold=gold_answer(row.get("gold")))
    if json_scale is not None:
        prompt += (f'\n\nAnswer with JSON only: {{"score": N}}, N your score from 0 to '
                   f"{json_scale:g}.")
    return [{"role": "user", "content": prompt}]


def judge_reasons(rows: list[dict[str, Any]], cfg: PipelineConfig,
                  cache: ResponseCache | None = None, teacher: Any = None) -> list[str | None]:
    """Score every row (scores["judge"]) through the judge model; return drop reasons."""
    jc = cfg.filter.judge
    if jc is None or not rows:
        return [None] * len(rows)
    tc = jc.teacher or cfg.teacher
    template = str(cfg.resolve(jc.prompt))
    params = SamplingParams(temperature=jc.temperature, top_p=1.0, max_tokens=jc.max_tokens,
                            seed=cfg.seed)
    fmt, json_scale = None, None
    if jc.structured:
        fmt = structured.response_format({"name": "judge_score", "schema": SCORE_SCHEMA})
        json_scale = jc.scale
    jobs = [Job(key=str(i), messages=judge_messages(r, template, json_scale), params=params,
                samples=[0], response_format=fmt) for i, r in enumerate(rows)]
    teacher = teacher if teacher is not None else make_teacher(tc)
    results, _ = run_jobs(teacher, jobs, cache, price_in=tc.price_in_per_mtok,
                          price_out=tc.price_out_per_mtok, description="judge")
    reasons: list[str | None] = []
    for i, row in enumerate(rows):
        scores = row.setdefault("scores", {})
        comp = results.get((str(i), 0))
        if comp is None or comp.error:
            scores["judge"] = None
            scores["judge_error"] = ((comp.error if comp else None) or "no reply")[:300]
            reasons.append("judge call failed")
            continue
        score = (structured_score(comp, jc.scale) if jc.structured
                 else parse_judge_score(comp.text, jc.scale))
        scores["judge"] = None if score is None else round(score, 3)
        if score is None:
            scores["judge_error"] = f"no score in reply: {comp.text[-200:]!r}"
            reasons.append("judge gave no score")
        elif score < jc.threshold:
            reasons.append("low judge score")
        else:
            reasons.append(None)
    return reasons

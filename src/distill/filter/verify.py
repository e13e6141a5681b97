"""Verification of rationales: faithfulness, step arithmetic, and the verify filter's verdict.

Final answers are found and compared by `distill.answers` (`find_final_answer`, `answers_match`;
its docstring lists the markers and cleaning rules); this module checks what a rationale does
with its answer.

Faithfulness (`is_faithful`): a rationale is faithful when the result of its *last equation*
before the final-answer statement ("... 48 + 24 = 72 clips. The answer is 72.") equals the stated
final answer. Rationales with no equation, or non-numeric answers, cannot be checked: None.

Arithmetic (`wrong_steps`): every equation whose sides are plain arithmetic on numbers and whose
right-hand side is one number (``280 + 540 = 820``, ``<<48/2=24>>``, ``$3 x 4 = $12``) is
recomputed exactly; a result may be rounded, floored or ceiled to the decimals it shows
(``100 / 3 = 33.33``, ``17 / 3 = 5 and 2/3``). Text around an equation that makes it part of a
larger expression (a parenthesis, an operator before it), a percentage, a fraction operand,
algebra or a clock time leaves it unchecked rather than guessed at.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from distill.answers import (
    NUMBER_ALTERNATIVES,
    FinalAnswer,
    answers_match,
    canonical_number,
    find_final_answer,
    frac_to_slash,
    gold_answer,
    numbers_equal,
    numeric_value,
)
from distill.config import VerifyConfig
from distill.filter.rows import has_gold, response_of

# What follows an "=" (or the <<...=N>> calculator notes of GSM8K): the equation's result.
_EQ_RESULT = re.compile(r"(?:=|\\approx|≈)\s*\\?\$?\s*(-?\\[dt]?frac\{[^{}]*\}\{[^{}]*\}|"
                        rf"{NUMBER_ALTERNATIVES})(?![\w/])")


# ------------------------------------------------------------------------------ faithfulness


def equation_results(text: str) -> list[str]:
    """Right-hand sides of the equations in `text`, in order, as cleaned numbers."""
    out = []
    for m in _EQ_RESULT.finditer(text):
        value = canonical_number(frac_to_slash(m.group(1)))
        if value is not None:
            out.append(value)
    return out


def is_faithful(text: str | None, final: FinalAnswer | None = None) -> bool | None:
    """Does the rationale's last equation result equal its stated final answer? (module doc)."""
    final = final or find_final_answer(text)
    if not text or final is None or numeric_value(final.value) is None:
        return None
    results = equation_results(text[: final.start])
    if not results:
        return None
    return bool(numbers_equal(results[-1], final.value))


_OPERAND = r"\$?\s?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?(?![\d.,]*\d)"
_OPERATOR = r"\s*(?:[-+*/×÷−]|\s[xX](?=\s))\s*"
_SIDE = rf"[-−]?{_OPERAND}(?:{_OPERATOR}{_OPERAND})*"
_CHAIN = re.compile(rf"(?<![\w.,$]){_SIDE}(?:\s*=\s*{_SIDE})+")
_TOKEN = re.compile(rf"({_OPERAND})|({_OPERATOR})")
_BEFORE_BREAKS = set("()/*+×÷−-^%:")
_AFTER_BREAKS = set("(/*×÷^%+-−:")
# Fractions as operands ("3 / 1/4", "8 x 1 1/2") and clock times ("0900") are ambiguous.
_AMBIGUOUS = re.compile(r"/[^=]*/|\d\s+\d+\s*/|(?<![\d.,])0\d")
# A word that makes the numbers after it part of a larger expression ("half of 10 + 4").
_BEFORE_WORDS = re.compile(r"\b(?:of|times|by|plus|minus|over|into|per)\s*$", re.I)


def _side_value(side: str) -> tuple[Fraction, int] | None:
    """(exact value, decimals shown) of `a op b op c` with * and / before + and -, or None."""
    side = side.strip()
    sign = -1 if side[:1] in "-−" else 1
    terms: list[Fraction] = []
    value: Fraction | None = None
    op, decimals, n = "+", 0, 0
    for m in _TOKEN.finditer(side[1:] if sign < 0 else side):
        if m.group(1):
            raw = m.group(1).replace("$", "").replace(",", "").strip()
            decimals = len(raw.partition(".")[2])
            x, n = Fraction(raw), n + 1
            if op in "*×xX":
                value = value * x  # type: ignore[operator]
            elif op in "/÷":
                if x == 0:
                    return None
                value = value / x  # type: ignore[operator]
            else:
                if value is not None:
                    terms.append(value)
                value = x if op == "+" else -x
        else:
            op = m.group(2).strip()
    if value is None:
        return None
    terms.append(value)
    terms[0] *= sign
    return sum(terms, Fraction(0)), (decimals if n == 1 else -1)


def wrong_steps(text: str | None) -> list[str] | None:
    """The checkable equations of `text` whose arithmetic is wrong (module doc); None when it
    has no checkable equation."""
    if not text:
        return None
    checked, wrong = 0, []
    for m in _CHAIN.finditer(text):
        before = text[max(0, m.start() - 64): m.start()].rstrip()[-1:]  # not the whole prefix
        after = text[m.end():].lstrip()[:1]
        glued = text[m.end(): m.end() + 1]  # "= 5A", "= 1.2Y": algebra, not a result
        signed = m.group(0)[:1] in "-−"  # "3*X - 3*6 = 77": a binary minus, not a sign
        if (before in _BEFORE_BREAKS or before.isdigit() or (signed and before.isalnum())
                or after in _AFTER_BREAKS or after.isdigit() or glued.isalpha()
                or _BEFORE_WORDS.search(text[max(0, m.start() - 12): m.start()])):
            continue
        parts = m.group(0).split("=")
        sides = [None if _AMBIGUOUS.search(p) else _side_value(p) for p in parts]
        for left, right, lhs, rhs in zip(sides, sides[1:], parts, parts[1:], strict=False):
            if left is None or right is None or right[1] < 0 or left[1] >= 0:
                continue  # only "expression = one number" is a result to check
            checked += 1
            # Rounded, floored or ceiled to the decimals the result shows ("17/3 = 5 and 2/3").
            tol = Fraction(1, 10 ** right[1]) if left[0].denominator != 1 else Fraction(0)
            if abs(left[0] - right[0]) >= max(tol, Fraction(1, 10**9)):
                wrong.append(f"{lhs.strip()} = {rhs.strip()}")
    return wrong if checked else None


# ------------------------------------------------------------------------------------ filter


def verify_row(row: dict[str, Any], cfg: VerifyConfig, *, answers_expected: bool = True
               ) -> str | None:
    """Score one row (scores: verified, faithful, truncated, answer_source); return a drop
    reason or None. `answers_expected` is False for instruction data (no final answer to find)."""
    scores = row.setdefault("scores", {})
    text = response_of(row)
    final = find_final_answer(text)
    if row.get("answer") in (None, "") and final is not None:
        row["answer"] = final.value  # bring-your-own rows: fill the field the student set uses
    answer = gold_answer(row.get("answer"))
    if cfg.require_explicit_answer and (final is None or final.source == "last_number"):
        answer = None
    cut = row.get("finish_reason") == "length"
    scores["answer_source"] = final.source if final else None
    scores["truncated"] = cut or (answers_expected and answer is None)
    if cfg.drop_truncated and cut:
        return "truncated (finish_reason=length)"
    if not answers_expected and not has_gold(row):
        return None
    scores["verified"] = None
    if answer is None:
        if has_gold(row):
            scores["verified"] = False
        if cfg.drop_truncated:
            return "truncated (no final answer)"
        return "no final answer" if has_gold(row) or cfg.require_gold else None
    if cfg.faithfulness:
        scores["faithful"] = is_faithful(text, final)
    if has_gold(row):
        scores["verified"] = answers_match(answer, row["gold"])
        if not scores["verified"]:
            return "wrong answer"
    elif cfg.require_gold:
        return "no gold answer"
    if cfg.faithfulness and scores["faithful"] is False:
        return "unfaithful (last equation differs from the answer)"
    if cfg.arithmetic:
        wrong = wrong_steps(text[: final.start] if final is not None else text)
        scores["arithmetic_ok"] = None if wrong is None else not wrong
        if wrong:
            scores["wrong_step"] = wrong[0]
            return "wrong arithmetic in a step"
    return None

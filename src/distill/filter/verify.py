"""Final-answer extraction that survives real teacher text, comparison with gold, faithfulness.

`find_final_answer` looks for the answer the way a grader would, the strongest marker first:

    #### 18  >  \\boxed{18}  >  "The (final) answer is 18" / "Answer: 18"  >  **18** in the last
    paragraph  >  a multiple-choice letter on the last line "(B) ..."  >  the last number.

Within one kind the *last* occurrence wins (teachers restate and correct themselves). The candidate
is then cleaned: markdown and LaTeX wrappers go, trailing sentences are cut ("18. She has ..."),
"$1,200.00" becomes 1200, "12 apples" becomes 12, "\\frac{3}{4}" becomes 3/4, "x = 5" becomes 5,
"(B) 12 apples" becomes B. Anything that is not a plain number stays as text for math-verify.

`answers_match` compares a prediction with gold: exact string, then a fast exact-fraction numeric
path (percentages compare equal to the number and to its hundredth), then math-verify for
expressions. Gold may be a bare answer or a whole GSM8K solution ending in "#### 18".

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
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from distill.config import VerifyConfig

# A plain number: sign, optional currency, thousands groups or digits, decimals, optional percent.
_NUM = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|[-−]?\$?\.\d+"
_FRAC = r"[-−]?\d+\s*/\s*\d+"
_MIXED = r"\d+\s+\d+\s*/\s*\d+"
# Longest alternatives first so "1 1/2" is not read as "1" and "3/4" not as "3".
NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_MIXED}|{_FRAC}|{_NUM})(?:\s?%)?(?![\w/])", re.I)

_WORD_NUMBERS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
    "ninety": 90, "hundred": 100,
}

_PHRASES = re.compile(
    r"(?:final\s+answer|(?:the\s+)?(?:correct\s+|final\s+)?answer(?:\s+to\s+[^.\n]{0,60}?)?"
    r"|(?:correct\s+)?(?:option|choice))"
    r"\s*(?:is|would\s+be|will\s+be|should\s+be|=|[:：])\s*[:：]?",
    re.I,
)
_BOLD = re.compile(r"\*\*([^*\n]{1,40})\*\*")
_CHOICE_LINE = re.compile(r"^\W{0,3}\(([A-Ea-e])\)|^\W{0,3}([A-E])\)(?:\s|$)")
# What follows an "=" (or the <<...=N>> calculator notes of GSM8K): the equation's result.
_EQ_RESULT = re.compile(r"(?:=|\\approx|≈)\s*\\?\$?\s*(-?\\[dt]?frac\{[^{}]*\}\{[^{}]*\}|"
                        rf"{_MIXED}|{_FRAC}|{_NUM})(?![\w/])")


@dataclass(frozen=True)
class FinalAnswer:
    value: str
    """The cleaned answer: "1200", "3/4", "45%", "B", or an expression / text."""
    source: str
    """Which marker found it: ####, boxed, phrase, bold, choice, last_number."""
    start: int
    """Offset in the text where the answer statement begins (the rationale ends there)."""


# ---------------------------------------------------------------------------------- cleaning


def _boxed_spans(text: str) -> list[tuple[int, str]]:
    """(start, content) of every \\boxed{...} / \\fbox{...}, nested braces included."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append((m.start(), text[m.end() : i - 1]))
    return out


def _strip_latex(s: str) -> str:
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac34
    for _ in range(3):  # \text{\textbf{...}}: unwrap a few levels
        s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = s.replace("\\%", "%").replace("\\$", "$")
    s = re.sub(r"\\[,;:!> ]|\\quad|\\qquad|\\left|\\right|\\displaystyle", " ", s)
    s = re.sub(r"\\[()\[\]]", " ", s)
    return s


def _frac_to_slash(s: str) -> str:
    return re.sub(r"\\frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}", r"\1/\2", s)


def canonical_number(token: str) -> str | None:
    """'$1,200.00' -> '1200', '.5' -> '0.5', '45 %' -> '45%', '1 1/2' -> '3/2', '6/8' -> '6/8'."""
    s = token.replace("−", "-").replace("$", "").replace(",", "").strip()
    pct = s.endswith("%")
    s = s.rstrip("%").strip()
    mixed = re.fullmatch(r"(-?)(\d+)\s+(\d+)\s*/\s*(\d+)", s)
    if mixed and int(mixed.group(4)):
        sign, whole, num, den = mixed.groups()
        frac = (int(whole) + Fraction(int(num), int(den))) * (-1 if sign else 1)
        s = f"{frac.numerator}/{frac.denominator}"
    s = s.replace(" ", "")
    if re.fullmatch(r"-?\d+/\d+", s):
        return s + ("%" if pct else "")
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return None
    if s.startswith("-."):
        s = "-0" + s[1:]
    elif s.startswith("."):
        s = "0" + s
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s + ("%" if pct else "")


def _is_expression(rest: str) -> bool:
    """Text around a number that makes it an expression (x^2, 2+3, \\sqrt{2}), not a unit."""
    return bool(re.search(r"[+*^/\\{}<>=×÷]|\d\s*-|-\s*\d|\b[a-z]\s*[-+]", rest))


def clean_answer(candidate: str | None) -> str | None:
    """Turn a raw answer span into a comparable answer (see the module docstring)."""
    if candidate is None:
        return None
    s = candidate.strip()
    s = re.sub(r"\*\*|__|`", "", s)
    s = _strip_latex(s)
    s = _frac_to_slash(s)
    s = s.split("\n")[0].strip()
    # A trailing sentence: cut at the first period followed by space/end (not a decimal point).
    s = re.split(r"\.(?=\s|$)", s, maxsplit=1)[0]
    s = s.replace("$", " ").strip(" \t:;,!?*")
    if not s:
        return None
    choice = (re.fullmatch(r"\(?([A-E])\)?\.?", s) or re.match(r"\(([A-Ea-e])\)", s)
              or re.match(r"([A-E])[).:](?:\s|$)", s)
              or re.match(r"(?:option|choice)\s+\(?([A-E])\)?", s, re.I))
    if choice:
        return choice.group(1).upper()
    if "=" in s and s.rsplit("=", 1)[1].strip():
        s = s.rsplit("=", 1)[1].strip()
    s = re.split(r"\\approx|≈", s)[-1].strip()
    nums = list(NUMBER_RE.finditer(s))
    if nums:
        rest = NUMBER_RE.sub(" ", s)
        if not _is_expression(rest):  # "12 apples" -> 12; "12 apples and 3 pears" -> 12
            return canonical_number(nums[0].group(0))
        return re.sub(r"\s+", " ", s).strip()
    words = re.findall(r"[a-z]+", s.lower())
    if words and len(words) <= 3 and words[0] in _WORD_NUMBERS:
        return str(_WORD_NUMBERS[words[0]])
    return re.sub(r"\s+", " ", s).strip().rstrip(".") or None


# -------------------------------------------------------------------------------- extraction


def find_final_answer(text: str | None) -> FinalAnswer | None:
    """The final answer stated in `text`, where it was stated and how it was found."""
    if not text or not text.strip():
        return None
    hashes = list(re.finditer(r"####\s*([^\n]*)", text))
    for m in reversed(hashes):
        value = clean_answer(m.group(1))
        if value:
            return FinalAnswer(value, "####", m.start())
    for start, content in reversed(_boxed_spans(text)):
        value = clean_answer(content)
        if value:
            return FinalAnswer(value, "boxed", start)
    for m in reversed(list(_PHRASES.finditer(text))):
        span = text[m.end() : m.end() + 200]
        value = clean_answer(span)
        if not value:
            continue
        # "Answer: Let's compute ... 3 + 4 = 7" opens a working, it states no answer: a
        # sentence-like answer (2+ words) followed by more numbers is a heading, not an answer.
        sentence_end = re.search(r"\.(?=\s|$)|\n", span)
        after = text[m.end() + (sentence_end.end() if sentence_end else len(span)) :]
        wordy = len(re.findall(r"[A-Za-z]{2,}", value)) >= 2
        if wordy and numeric_value(value) is None and NUMBER_RE.search(after):
            continue
        return FinalAnswer(value, "phrase", m.start())
    last_par = text.rstrip().rsplit("\n\n", 1)[-1]
    offset = len(text.rstrip()) - len(last_par)
    for m in reversed(list(_BOLD.finditer(last_par))):
        inner = m.group(1).strip()
        if inner.endswith(":") or inner.lower().startswith("step"):
            continue
        value = clean_answer(inner)
        if value and NUMBER_RE.fullmatch(value):
            return FinalAnswer(value, "bold", offset + m.start())
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    choice = _CHOICE_LINE.match(lines[-1].strip()) if lines else None
    if choice:
        return FinalAnswer((choice.group(1) or choice.group(2)).upper(), "choice",
                           text.rfind(lines[-1]))
    nums = list(NUMBER_RE.finditer(_frac_to_slash(text)))
    if nums:
        value = canonical_number(nums[-1].group(0))
        if value:
            pos = text.rfind(nums[-1].group(0).strip())
            return FinalAnswer(value, "last_number", max(pos, 0))
    return None


def extract_answer(text: str | None) -> str | None:
    """The cleaned final answer of a response, or None when it states none."""
    found = find_final_answer(text)
    return found.value if found else None


def gold_answer(gold: Any) -> str | None:
    """The answer in a gold field: a bare answer ("18", "\\frac{3}{4}", 3.5) or a worked solution
    ("... #### 18", "... \\boxed{18}")."""
    if gold is None:
        return None
    if isinstance(gold, bool):
        return str(gold)
    if isinstance(gold, int | float):
        return canonical_number(repr(gold)) if isinstance(gold, float) else str(gold)
    text = str(gold).strip()
    if not text:
        return None
    if "####" in text or "\\boxed" in text or "\n" in text or len(text) > 80:
        return extract_answer(text)
    return clean_answer(text)


# -------------------------------------------------------------------------------- comparison


def numeric_value(answer: str | None) -> tuple[Fraction, bool] | None:
    """(exact value, is a percentage) of a cleaned numeric answer, else None."""
    if not answer:
        return None
    s = answer.strip()
    pct = s.endswith("%")
    s = s.rstrip("%").strip()
    try:
        if re.fullmatch(r"-?\d+/\d+", s):
            num, den = s.split("/")
            return (Fraction(int(num), int(den)), pct) if int(den) else None
        if re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", s):
            return Fraction(s), pct
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _close(a: Fraction, b: Fraction) -> bool:
    return a == b or abs(a - b) <= Fraction(1, 10**6) * max(Fraction(1), abs(b))


def numbers_equal(a: str | None, b: str | None) -> bool | None:
    """Numeric equality of two cleaned answers; None when either is not a number."""
    va, vb = numeric_value(a), numeric_value(b)
    if va is None or vb is None:
        return None
    (x, xp), (y, yp) = va, vb
    if xp == yp:
        return _close(x, y)
    # "45%" against "45" (what percent ...?) or against "0.45".
    p, q = (x, y) if xp else (y, x)
    return _close(p, q) or _close(p / 100, q)


def text_key(s: str) -> str:
    return re.sub(r"[\s.,;:!?'\"`*]+", " ", s.casefold()).strip()


def _math_verify(gold: str, pred: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - a core dependency, but never crash a filter on it
        return False
    # math-verify's timeouts use SIGALRM, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"${gold}$", parsing_timeout=timeout)  # type: ignore[arg-type]
        p = parse(f"${pred}$", parsing_timeout=timeout)  # type: ignore[arg-type]
        return bool(g and p and verify(g, p, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - an unparsable answer is simply not a match
        return False


def answers_match(pred: Any, gold: Any) -> bool:
    """True when a prediction (a cleaned answer or a whole response) equals the gold answer."""
    if pred is None or gold is None:
        return False
    g = gold_answer(gold)
    p = gold_answer(pred)  # same rules: a bare answer is cleaned, a worked text is extracted
    if not p or not g:
        return False
    if p == g:
        return True
    same = numbers_equal(p, g)
    if same is not None:
        return same
    if len(g) == 1 and g.isalpha():  # multiple choice
        return p.upper() == g.upper()
    if text_key(p) == text_key(g):
        return True
    return _math_verify(g, p)


# ------------------------------------------------------------------------------ faithfulness


def equation_results(text: str) -> list[str]:
    """Right-hand sides of the equations in `text`, in order, as cleaned numbers."""
    out = []
    for m in _EQ_RESULT.finditer(text):
        value = canonical_number(_frac_to_slash(m.group(1)))
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
    from distill.filter.rows import has_gold, response_of

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

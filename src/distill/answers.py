"""Final answers: extraction from teacher text, comparison with gold, and response parsing.

The one home of "what did this text answer, and is it right": the filter (verify, consistency,
judge), generation (rationale and answer fields), the evaluate stage and the dev curves all read
answers through this module, so a teacher row, a filter verdict and an evaluation score can never
disagree on the same text. A leaf module: it imports only the standard library (and math-verify,
lazily), so anything in `distill` may import it without creating an import cycle.

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

Reasoning (`split_think`, `parse_response`): reasoning models put their trace in
`<think>...</think>` (tags in any case), or the server returns it separately; a chat template
that opens the think block in the prompt leaves only the closing tag in the output, and a
response cut by max_tokens never closes its block. The visible text is the rationale a student
learns from; with nothing visible the rationale falls back to the trace. `score` grades one
completion against gold: the evaluate stage and the dev curves use it, so both grade alike.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

# A plain number: sign, optional currency, thousands groups or digits, decimals, optional percent.
_NUM = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|[-−]?\$?\.\d+"
_FRAC = r"[-−]?\d+\s*/\s*\d+"
_MIXED = r"\d+\s+\d+\s*/\s*\d+"
# Longest alternatives first so "1 1/2" is not read as "1" and "3/4" not as "3". Public: the
# faithfulness check (filter/verify.py) reads equation results with the same number syntax.
NUMBER_ALTERNATIVES = rf"{_MIXED}|{_FRAC}|{_NUM}"
NUMBER_RE = re.compile(rf"(?<![\w.])(?:{NUMBER_ALTERNATIVES})(?:\s?%)?(?![\w/])", re.I)

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


def frac_to_slash(s: str) -> str:
    """'\\frac{3}{4}' -> '3/4' (numeric numerator and denominator only)."""
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
    s = frac_to_slash(s)
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
    nums = list(NUMBER_RE.finditer(frac_to_slash(text)))
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
        g = parse(f"${gold}$", parsing_timeout=timeout)
        p = parse(f"${pred}$", parsing_timeout=timeout)
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


# --------------------------------------------------------------------------------- reasoning

_THINK_TAG = re.compile(r"<(/?)think>", re.I)

REASONING_SEPARATOR = "\n\n"
"""Between reasoning pieces (several think blocks, or a server's reasoning field and an inline
block). A blank line keeps each piece its own paragraph: that is what the OpenAI-compatible
teacher always produced (its tests pin it), and `find_final_answer` reads a bold answer only in
the last paragraph, so a block boundary must stay a paragraph boundary ("\\n" glued the last
two blocks into one paragraph)."""


def join_reasoning(*parts: str | None) -> str | None:
    """The non-empty `parts`, stripped, joined by REASONING_SEPARATOR; None when all are empty."""
    kept = [p.strip() for p in parts if p and p.strip()]
    return REASONING_SEPARATOR.join(kept) or None


def split_think(text: str) -> tuple[str | None, str]:
    """(reasoning or None, visible text) of one completion; tags match in any case.

    One rule covers every server and template: a piece of text is reasoning when it follows an
    opening `<think>` or precedes a closing `</think>`; the rest is visible. So `<think>a</think>b`
    is (a, b); `a</think>b` (the template opened the block) is (a, b); `<think>a` (cut off by
    max_tokens) is (a, ""); `<think>a</think>x<think>b</think>y` is (a + blank line + b, "xy").
    Text without any tag comes back unchanged (not even stripped), with no reasoning.
    """
    pieces = _THINK_TAG.split(text)
    if len(pieces) == 1:
        return None, text
    segments, closing = pieces[0::2], [tag == "/" for tag in pieces[1::2]]
    thought: list[str] = []
    visible: list[str] = []
    for i, seg in enumerate(segments):
        after_open = i > 0 and not closing[i - 1]
        before_close = i < len(closing) and closing[i]
        (thought if after_open or before_close else visible).append(seg)
    return join_reasoning(*thought), "".join(visible).strip()


def parse_response(text: str | None, reasoning: str | None = None) -> dict[str, str | None]:
    """Return {reasoning, rationale, answer} of one teacher (or student) completion.

    reasoning: the server's reasoning field, then the inline think blocks (REASONING_SEPARATOR).
    rationale: the visible text (think blocks removed), or the reasoning when nothing is visible.
    answer: the cleaned final answer of the visible text, else of the reasoning, else None (a
    response cut inside its think block often states none: the verify filter flags it).
    """
    think, visible = split_think(text or "")
    if reasoning and think:
        reasoning = join_reasoning(reasoning, think)
    reasoning = reasoning or think
    answer = extract_answer(visible) or (extract_answer(reasoning) if reasoning else None)
    rationale = visible.strip() or (reasoning or "").strip()
    return {"reasoning": reasoning, "rationale": rationale, "answer": answer}


def score(completion: str | None, gold: Any, *, reasoning: str | None = None) -> bool:
    """Is the final answer of `completion` (a model's raw output; `reasoning`: the server's
    separate reasoning field, if any) the gold answer? The grade of the evaluate stage and of
    the dev curves: the answer `parse_response` finds, compared by `answers_match`."""
    return answers_match(parse_response(completion, reasoning)["answer"], gold)

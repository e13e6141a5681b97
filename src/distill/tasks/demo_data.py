"""The offline demo's training data: chat-formatted solutions and plain arithmetic drills.

`encode_sft` turns task rows into (input_ids, labels) with the loss on the answer only; the
drills (`drill_equation`, `binding_drill`, `arithmetic_drills`) are the base student's
"pretraining": arithmetic and looking numbers up, never a word problem or a chat turn.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from distill.tasks import prompt_text
from distill.tasks.demo_tokenizer import END


def target_text(row: dict, target: str) -> str:
    """What the assistant says: the gold chain of thought, or the bare answer line."""
    if target == "cot":
        return str(row["solution"])
    if target == "label":
        return f"The answer is {row['answer']}."
    raise ValueError(f"target: {target!r}; expected 'cot' or 'label'")


def prompt_ids(tok: Any, question: str) -> list[int]:
    messages = [{"role": "user", "content": prompt_text(question)}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


def encode_sft(tok: Any, rows: Sequence[dict], target: str = "cot",
               texts: Sequence[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs; labels are -100 on the prompt so loss is on the answer only."""
    out = []
    for i, row in enumerate(rows):
        p = prompt_ids(tok, row["question"])
        answer = texts[i] if texts is not None else target_text(row, target)
        a = tok(answer + END, add_special_tokens=False)["input_ids"]
        out.append((p + a, [-100] * len(p) + a))
    return out


def _drill_operand(rng: random.Random) -> int:
    digits = rng.choice((1, 2, 2, 3, 3))
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _round_operand(rng: random.Random) -> int:
    return rng.randint(1, 9) * 100 if rng.random() < 0.4 else rng.randint(1, 99) * 10


def drill_equation(rng: random.Random, close_sub: float = 0.0, round_ops: float = 0.0) -> str:
    """One random ``a op b = c.`` line over the operand ranges the word problems use.

    `close_sub`: the share of subtractions whose result is small (1-200) next to a 3-digit
    first operand, like a word problem's "what is left" step (``493 - 470 = 23.``); two
    independent operands rarely make one. `round_ops`: the share of additions and subtractions
    whose operands are both multiples of 10 (of 100 for 40% of them), like the products of
    speeds and hours a word problem adds (``300 + 500 = 800.``); independent operands make one
    in a hundred."""
    op = rng.choice("+-*/")
    if op in "*/":
        a, b = rng.randint(2, 12), rng.randint(2, 12) * (10 if rng.random() < 0.2 else 1)
        if op == "/":
            return f"{a * b} / {a} = {b}."
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        return f"{a} * {b} = {a * b}."
    rounded = bool(round_ops) and rng.random() < round_ops
    draw = _round_operand if rounded else _drill_operand
    a, b = draw(rng), draw(rng)
    if op == "-":
        if close_sub and not rounded and rng.random() < close_sub:
            a = rng.randint(100, 999)
            b = a - rng.randint(1, min(200, a - 1))
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}."
    while a + b > 999:
        a, b = draw(rng), draw(rng)
    return f"{a} + {b} = {a + b}."


def _apply(rng: random.Random, x: int, y: int) -> tuple[str, int, int, int] | None:
    """A random op on (x, y) (maybe swapped) that keeps the result in 0..999, or None."""
    options = []
    if x + y <= 999:
        options.append(("+", x, y, x + y))
    options.append(("-", max(x, y), min(x, y), max(x, y) - min(x, y)))
    if x * y <= 999 and min(x, y) <= 12:
        options.append(("*", x, y, x * y))
    for a, b in ((x, y), (y, x)):
        if 2 <= b <= 12 and a % b == 0:
            options.append(("/", a, b, a // b))
    return rng.choice(options) if options else None


def binding_drill(rng: random.Random) -> str:
    """A short symbolic chain: numbers bound to letters, then 2-4 steps that look them up.

    ``b = 4, k = 12, q = 7.`` / ``d = b * k = 4 * 12 = 48.`` / ``w = d + q = 48 + 7 = 55.``
    Looking a value up by name (and reusing the last result) is the in-context copying that
    reading a word problem needs, without any word problem in the text.
    """
    names = rng.sample("abcdefghjkmnpqrstuvwxyz", 8)
    n_given = rng.randint(2, 4)
    values = {n: rng.choice((rng.randint(2, 12), _drill_operand(rng))) for n in names[:n_given]}
    lines = [", ".join(f"{n} = {v}" for n, v in values.items()) + "."]
    known = list(values)
    for target in names[n_given : n_given + rng.randint(2, 4)]:
        for _ in range(20):
            x, y = rng.sample(known[-3:] if len(known) > 3 else known, 2)
            step = _apply(rng, values[x], values[y])
            if step is not None:
                break
        else:
            break
        op, a, b, c = step
        na, nb = (x, y) if (values[x], values[y]) == (a, b) else (y, x)
        lines.append(f"{target} = {na} {op} {nb} = {a} {op} {b} = {c}.")
        values[target] = c
        known.append(target)
    return "\n".join(lines)


def arithmetic_drills(tok: Any, n: int, seed: int = 0, per_sequence: int = 6,
                      binding: float = 0.5, close_sub: float = 0.0, round_ops: float = 0.0
                      ) -> list[tuple[list[int], list[int]]]:
    """Plain-text "pretraining" for a base model: equation drills and letter-binding chains.

    No word problems and no chat turns: a model trained on these knows arithmetic and how to look
    numbers up in context, not how to read or solve the task's questions.
    """
    rng = random.Random(f"drills|{seed}")
    out = []
    for _ in range(n):
        if rng.random() < binding:
            text = binding_drill(rng)
        else:
            text = "\n".join(drill_equation(rng, close_sub, round_ops) for _ in range(per_sequence))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append((ids, list(ids)))
    return out

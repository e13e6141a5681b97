"""Procedural multi-step arithmetic word problems in GSM8K-like phrasing.

Each template draws a few small integers, checks that every intermediate result stays a
non-negative integer below 1000 (divisions exact), and writes the question, a gold chain of
thought (one short line per step, e.g. ``The pens cost 3 * 4 = 12 dollars.``) and the answer.

Train and test never share a problem: a row's split is a function of a hash of its *canonical*
form (template id + numbers; names and item words are surface only), so the same arithmetic
can only ever land in one split, for every seed. Rows are drawn from a seeded RNG and kept only
when their hash says they belong to the requested split, so ``make_task(split, n, seed)`` is
deterministic and the first ``n`` rows of a larger request are the same rows.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

SOURCE = "arithmetic"
TEST_FRACTION = 0.2
"""Share of the canonical problem space that belongs to the test split."""
MAX_VALUE = 999
"""Every number in a problem (given or intermediate) stays in 0..MAX_VALUE."""
COT_SUFFIX = "Let's think step by step."

NAMES: tuple[tuple[str, str], ...] = (
    ("Ava", "she"), ("Ben", "he"), ("Carla", "she"), ("Dev", "he"), ("Elena", "she"),
    ("Farid", "he"), ("Grace", "she"), ("Hiro", "he"), ("Ines", "she"), ("Jamal", "he"),
    ("Kira", "she"), ("Leo", "he"), ("Maya", "she"), ("Nico", "he"), ("Olivia", "she"),
    ("Pablo", "he"), ("Rosa", "she"), ("Sam", "he"), ("Tara", "she"), ("Omar", "he"),
)
SHOP_ITEMS = ("apples", "notebooks", "pens", "oranges", "candles", "stickers", "mugs", "socks",
              "plants", "comic books", "pencils", "toy cars")
SHARED_THINGS = ("candies", "marbles", "cookies", "stickers", "crayons", "shells", "cards")
PURCHASES = ("bike", "game", "jacket", "pair of shoes", "book", "lamp", "backpack")
FOODS = ("cakes", "pancakes", "muffins", "pies", "loaves of bread")
VEHICLES = ("car", "bus", "train", "truck", "van")
WALKERS = ("cyclist", "runner", "hiker", "rower")

Step = tuple[str, int, str, int, int, str]
"""(words before, left operand, operator, right operand, result, words after)."""


@dataclass(frozen=True)
class Problem:
    template: str
    numbers: tuple[int, ...]
    question: str
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1][4]

    @property
    def key(self) -> str:
        """Canonical form: what makes two problems the same problem."""
        return f"{self.template}|{','.join(map(str, self.numbers))}"


def prompt_text(question: str) -> str:
    """The user turn every teacher and student sees: the question, then the CoT cue."""
    return f"{question}\n{COT_SUFFIX}"


def solution_text(steps: tuple[Step, ...]) -> str:
    lines = [f"{pre} {a} {op} {b} = {c}{post}." for pre, a, op, b, c, post in steps]
    lines.append(f"The answer is {steps[-1][4]}.")
    return "\n".join(lines)


_ANSWER_RE = re.compile(r"The answer is\s*\$?\s*(-?[\d,]+(?:\.\d+)?)")
_STEP_RE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def parse_answer(text: str) -> str | None:
    """The number after the last "The answer is", as a plain integer string when it is one."""
    found = _ANSWER_RE.findall(text or "")
    if not found:
        return None
    value = found[-1].replace(",", "")
    if "." in value and float(value).is_integer():
        value = str(int(float(value)))
    return value


def check_solution(solution: str) -> tuple[bool, int]:
    """Recompute every ``a op b = c`` line; return (all correct, number of equations)."""
    ops: dict[str, Callable[[int, int], float]] = {
        "+": lambda a, b: a + b, "-": lambda a, b: a - b,
        "*": lambda a, b: a * b, "/": lambda a, b: a / b if b else float("nan"),
    }
    eqs = _STEP_RE.findall(solution)
    ok = all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in eqs)
    return ok, len(eqs)


# --- templates ---------------------------------------------------------------------------------
# Each returns a Problem or None (None: the draw broke a bound; the caller draws again).

def _who(rng: random.Random) -> tuple[str, str, str]:
    name, he = rng.choice(NAMES)
    return name, he, he.capitalize()


def _shop(rng: random.Random, with_change: bool) -> Problem | None:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    p, q = rng.randint(2, 12), rng.randint(2, 12)
    item1, item2 = rng.sample(SHOP_ITEMS, 2)
    name, he, He = _who(rng)
    x, y = a * p, b * q
    total = x + y
    steps: list[Step] = [(f"The {item1} cost", a, "*", p, x, " dollars"),
                         (f"The {item2} cost", b, "*", q, y, " dollars"),
                         ("Together that is", x, "+", y, total, " dollars")]
    q_text = (f"{name} buys {a} {item1} for ${p} each and {b} {item2} for ${q} each.")
    if not with_change:
        return Problem("shop_total", (a, p, b, q), f"{q_text} How much does {he} spend in total?",
                       tuple(steps))
    bill = rng.choice([n for n in (50, 100, 200, 500) if n >= total])
    steps.append(("The change is", bill, "-", total, bill - total, " dollars"))
    return Problem("shop_change", (a, p, b, q, bill),
                   f"{q_text} {He} pays with a ${bill} bill. How much change does {he} get?",
                   tuple(steps))


def _share(rng: random.Random) -> Problem | None:
    bags, per_bag = rng.randint(2, 9), rng.randint(2, 12)
    total = bags * per_bag
    friends = rng.randint(2, 6)
    if total - 1 < friends:
        return None
    each = rng.randint(1, min(12, (total - 1) // friends))
    shared = friends * each
    kept = total - shared
    thing = rng.choice(SHARED_THINGS)
    name, he, He = _who(rng)
    question = (f"{name} has {bags} bags of {thing} with {per_bag} {thing} in each bag. "
                f"{He} keeps {kept} {thing} and shares the rest equally among {friends} friends. "
                f"How many {thing} does each friend get?")
    steps: tuple[Step, ...] = (
        ("In all there are", bags, "*", per_bag, total, f" {thing}"),
        ("After keeping some,", total, "-", kept, shared, f" {thing} are left"),
        ("Each friend gets", shared, "/", friends, each, f" {thing}"),
    )
    return Problem("share", (bags, per_bag, kept, friends), question, steps)


def _share_boxes(rng: random.Random) -> Problem | None:
    boxes, per_box = rng.randint(2, 9), rng.randint(2, 12)
    total = boxes * per_box
    divisors = [k for k in range(2, 10) if total % k == 0 and total // k <= 12]
    if not divisors:
        return None
    kids = rng.choice(divisors)
    thing = rng.choice(SHARED_THINGS)
    name, _, _ = _who(rng)
    question = (f"{name} buys {boxes} boxes of {thing}. Each box holds {per_box} {thing}. "
                f"The {thing} are shared equally among {kids} children. "
                f"How many {thing} does each child get?")
    steps: tuple[Step, ...] = (
        ("In all there are", boxes, "*", per_box, total, f" {thing}"),
        ("Each child gets", total, "/", kids, total // kids, f" {thing}"),
    )
    return Problem("share_boxes", (boxes, per_box, kids), question, steps)


def _save(rng: random.Random, with_start: bool) -> Problem | None:
    weekly, weeks = rng.randint(2, 12), rng.randint(2, 9)
    saved = weekly * weeks
    start = rng.randint(5, 60) if with_start else 0
    have = start + saved
    cost = rng.randint(3, have - 1)
    thing = rng.choice(PURCHASES)
    name, he, He = _who(rng)
    steps: list[Step] = [("The savings are", weekly, "*", weeks, saved, " dollars")]
    if with_start:
        question = (f"{name} has ${start}. {He} saves ${weekly} every week for {weeks} weeks. "
                    f"Then {he} buys a {thing} for ${cost}. How much money does {he} have now?")
        steps.append(("With the money from before that is", start, "+", saved, have, " dollars"))
        numbers: tuple[int, ...] = (start, weekly, weeks, cost)
    else:
        question = (f"{name} saves ${weekly} every week for {weeks} weeks. "
                    f"Then {he} spends ${cost} on a {thing}. How much money is left?")
        numbers = (weekly, weeks, cost)
    steps.append(("After the purchase", have, "-", cost, have - cost, " dollars are left"))
    return Problem("save_start" if with_start else "save", numbers, question, tuple(steps))


def _recipe_total(rng: random.Random) -> Problem | None:
    flour, sugar, batches = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 12)
    food = rng.choice(FOODS)
    name, he, _ = _who(rng)
    question = (f"One batch of {food} needs {flour} cups of flour and {sugar} cups of sugar. "
                f"{name} makes {batches} batches. How many cups of flour and sugar does {he} "
                f"use in total?")
    steps: tuple[Step, ...] = (
        ("The flour is", batches, "*", flour, batches * flour, " cups"),
        ("The sugar is", batches, "*", sugar, batches * sugar, " cups"),
        ("Together that is", batches * flour, "+", batches * sugar,
         batches * (flour + sugar), " cups"),
    )
    return Problem("recipe_total", (flour, sugar, batches), question, steps)


def _recipe_scale(rng: random.Random, with_stock: bool) -> Problem | None:
    per, k, j = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 12)
    if j == k:
        return None
    eggs_for_k, need = per * k, per * j
    food = rng.choice(FOODS)
    name, he, He = _who(rng)
    steps: list[Step] = [(f"One of the {food} needs", eggs_for_k, "/", k, per, " eggs"),
                         (f"For {j} {food} that is", per, "*", j, need, " eggs")]
    base = f"A recipe for {k} {food} uses {eggs_for_k} eggs."
    if not with_stock:
        question = f"{base} How many eggs are needed for {j} {food}?"
        return Problem("recipe_scale", (k, eggs_for_k, j), question, tuple(steps))
    stock = rng.randint(1, need - 1)
    question = (f"{base} {name} wants to make {j} {food}. {He} already has {stock} eggs. "
                f"How many more eggs does {he} need to buy?")
    steps.append(("More eggs needed:", need, "-", stock, need - stock, ""))
    return Problem("recipe_scale_stock", (k, eggs_for_k, j, stock), question, tuple(steps))


def _distance(rng: random.Random, with_trip: bool) -> Problem | None:
    fast = rng.random() < 0.5
    lo, hi = (3, 12) if not fast else (2, 12)
    v1, v2 = rng.randint(lo, hi), rng.randint(lo, hi)
    unit = 10 if fast else 1
    v1, v2 = v1 * unit, v2 * unit
    h1, h2 = rng.randint(2, 6), rng.randint(2, 6)
    d1, d2 = v1 * h1, v2 * h2
    total = d1 + d2
    who = rng.choice(VEHICLES if fast else WALKERS)
    steps: list[Step] = [("First it goes", v1, "*", h1, d1, " miles"),
                         ("Then it goes", v2, "*", h2, d2, " miles"),
                         ("In total that is", d1, "+", d2, total, " miles")]
    base = (f"A {who} travels at {v1} miles per hour for {h1} hours and then at {v2} miles per "
            f"hour for {h2} hours.")
    if not with_trip:
        return Problem("distance", (v1, h1, v2, h2),
                       f"{base} How many miles does it travel in total?", tuple(steps))
    if total >= MAX_VALUE:
        return None
    trip = total + rng.randint(1, min(200, MAX_VALUE - total))
    steps.append(("The miles left are", trip, "-", total, trip - total, ""))
    return Problem("distance_left", (trip, v1, h1, v2, h2),
                   f"The whole trip is {trip} miles long. {base} How many miles are left?",
                   tuple(steps))


def _pages(rng: random.Random, with_split: bool) -> Problem | None:
    per_day, days = rng.randint(3, 12), rng.randint(2, 9)
    read = per_day * days
    name, he, He = _who(rng)
    if with_split:
        rest_days, rest_per = rng.randint(2, 9), rng.randint(2, 12)
        rest = rest_days * rest_per
        pages = read + rest
        question = (f"A book has {pages} pages. {name} reads {per_day} pages every day for {days} "
                    f"days. {He} reads the rest in {rest_days} more days, the same number of pages "
                    f"each day. How many pages does {he} read on each of those days?")
        steps: tuple[Step, ...] = (
            ("The pages read so far are", per_day, "*", days, read, ""),
            ("The pages left are", pages, "-", read, rest, ""),
            ("Each day that is", rest, "/", rest_days, rest_per, " pages"),
        )
        return Problem("pages_split", (pages, per_day, days, rest_days), question, steps)
    pages = read + rng.randint(1, 150)
    question = (f"A book has {pages} pages. {name} reads {per_day} pages every day for {days} "
                f"days. How many pages are left to read?")
    steps = (("The pages read are", per_day, "*", days, read, ""),
             ("The pages left are", pages, "-", read, pages - read, ""))
    return Problem("pages", (pages, per_day, days), question, steps)


TEMPLATES: dict[str, Callable[[random.Random], Problem | None]] = {
    "shop_total": lambda r: _shop(r, with_change=False),
    "shop_change": lambda r: _shop(r, with_change=True),
    "share": _share,
    "share_boxes": _share_boxes,
    "save": lambda r: _save(r, with_start=False),
    "save_start": lambda r: _save(r, with_start=True),
    "recipe_total": _recipe_total,
    "recipe_scale": lambda r: _recipe_scale(r, with_stock=False),
    "recipe_scale_stock": lambda r: _recipe_scale(r, with_stock=True),
    "distance": lambda r: _distance(r, with_trip=False),
    "distance_left": lambda r: _distance(r, with_trip=True),
    "pages": lambda r: _pages(r, with_split=False),
    "pages_split": lambda r: _pages(r, with_split=True),
}


def split_of(key: str) -> str:
    """"test" or "train", from the canonical key alone (never from the seed)."""
    h = int.from_bytes(hashlib.sha256(f"{SOURCE}|{key}".encode()).digest()[:8], "big")
    return "test" if h % 10_000 < TEST_FRACTION * 10_000 else "train"


def _valid(p: Problem) -> bool:
    values = [*p.numbers] + [v for s in p.steps for v in (s[1], s[3], s[4])]
    return 2 <= len(p.steps) <= 4 and all(0 <= v <= MAX_VALUE for v in values)


def make_arithmetic(split: str = "train", n: int = 100, seed: int = 0) -> list[dict]:
    """`n` distinct problems of `split` ("train" or "test"), the same for the same seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split: {split!r}; expected 'train' or 'test'")
    # Different seeds give different streams; the split salt keeps train/test streams apart.
    rng = random.Random(f"{SOURCE}|{split}|{seed}")
    names = sorted(TEMPLATES)
    rows: list[dict] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 200 * n + 1000
    while len(rows) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could only draw {len(rows)} distinct {split} problems of {n}")
        problem = TEMPLATES[rng.choice(names)](rng)
        if problem is None or not _valid(problem) or problem.key in seen:
            continue
        if split_of(problem.key) != split:
            continue
        seen.add(problem.key)
        rows.append({
            "id": f"{SOURCE}-{split}-{seed}-{len(rows):05d}",
            "question": problem.question,
            "answer": str(problem.answer),
            "solution": solution_text(problem.steps),
            "source": SOURCE,
            "steps": len(problem.steps),
            "template": problem.template,
            "canonical": problem.key,
        })
    return rows

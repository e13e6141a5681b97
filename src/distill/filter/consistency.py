"""Self-consistency: a majority vote over the samples of each seed.

Answers vote by their normalized form ("$1,200.00", "1200" and "1,200" are one vote; "(b)" and
"B" are one vote). A seed's agreement is the majority's share of *all* its samples, answerless
ones included, so a teacher that agrees with itself 3 times out of 8 scores 0.375.

Seeds without gold: the majority answer becomes `pseudo_label` (gold stays None) and the seed is
kept when agreement >= min_agreement and the top answers do not tie. Seeds with gold are judged by
verify; here they only get their agreement recorded, unless `vote_on_gold` is set.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from distill.answers import gold_answer, numeric_value, text_key
from distill.config import ConsistencyConfig
from distill.filter.rows import answer_of, has_gold, seed_of


def vote_key(answer: str | None) -> str | None:
    """The form answers vote in: exact value for numbers (percent sign ignored), else text."""
    answer = gold_answer(answer)
    if answer is None:
        return None
    value = numeric_value(answer)
    if value is not None:
        return f"{value[0].numerator}/{value[0].denominator}"
    return text_key(answer) or None


@dataclass(frozen=True)
class Vote:
    answer: str | None
    """The majority answer as first written by a sample (None: no sample had an answer)."""
    key: str | None
    count: int
    total: int
    tied: bool

    @property
    def agreement(self) -> float:
        return self.count / self.total if self.total else 0.0


def majority_votes(rows: list[dict[str, Any]]) -> dict[str, Vote]:
    """Seed -> vote over the given rows (every sample of the seed that reached this filter)."""
    by_seed: dict[str, list[str | None]] = defaultdict(list)
    for row in rows:
        by_seed[seed_of(row)].append(answer_of(row))
    votes = {}
    for seed, answers in by_seed.items():
        first: dict[str, str] = {}
        counts: Counter[str] = Counter()
        for a in answers:
            k = vote_key(a)
            if k is not None and a is not None:
                first.setdefault(k, a)
                counts[k] += 1
        top = counts.most_common(2)
        if not top:
            votes[seed] = Vote(None, None, 0, len(answers), tied=False)
            continue
        key, count = top[0]
        tied = len(top) > 1 and top[1][1] == count
        votes[seed] = Vote(first[key], key, count, len(answers), tied)
    return votes


def consistency_reasons(rows: list[dict[str, Any]], voters: list[dict[str, Any]],
                        cfg: ConsistencyConfig) -> list[str | None]:
    """Score `rows` (agreement, majority; pseudo_label for seeds without gold) and return a drop
    reason or None for each. `voters` are all the samples that vote (rows is a subset)."""
    votes = majority_votes(voters)
    reasons: list[str | None] = []
    for row in rows:
        vote = votes.get(seed_of(row)) or majority_votes([row])[seed_of(row)]
        scores = row.setdefault("scores", {})
        in_majority = vote.key is not None and vote_key(answer_of(row)) == vote.key
        scores["agreement"] = round(vote.agreement, 4)
        scores["majority"] = in_majority
        gold = has_gold(row)
        if not gold:
            row["pseudo_label"] = None if vote.tied else vote.answer
        if gold and not cfg.vote_on_gold:
            reasons.append(None)
        elif vote.key is None:
            reasons.append("no answer to vote on")
        elif vote.tied:
            reasons.append("tied vote")
        elif vote.agreement < cfg.min_agreement:
            reasons.append("low agreement")
        elif cfg.keep == "majority" and not in_majority:
            reasons.append("not the majority answer")
        else:
            reasons.append(None)
    return reasons

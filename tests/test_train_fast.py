"""The fast CPU training path (issue #26): every lever gives the reference path's loss.

On the real SmolLM2-135M: the compact LM head (SFT and KD, cross-tokenizer KD included) trains
the same losses and adapters as the full head; activation checkpointing and length-bucketed
batches leave the math alone; `bf16: auto` and `gradient_checkpointing: auto` resolve from what
the machine and the student are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from distill.config import PipelineConfig
from distill.train import memory, precision
from distill.train.head import logits_at, masked_logits, next_token_mask, supports_logits_to_keep

ROOT = Path(__file__).resolve().parents[1]


def _cfg(student: Path, **train: Any) -> PipelineConfig:
    t = {"student": str(student), "max_steps": 3, "batch_size": 2, "max_length": 96,
         "learning_rate": 1e-3, "logging_steps": 1, "seed": 0, "lora": {"r": 4, "alpha": 8},
         "gradient_checkpointing": False, "group_by_length": False} | train
    return PipelineConfig.model_validate({"name": "fast", "seeds": {"path": "s.jsonl"},
                                          "train": t, "root": str(student.parent)})


def _rows(n: int = 6) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        steps = " ".join(f"{i} + {j} = {i + j}." for j in range(2 + i % 3))
        rows.append({"id": f"r{i}", "seed_id": f"s{i}", "question": f"What is {i} + 3?",
                     "messages": [{"role": "user", "content": f"What is {i} + 3?"},
                                  {"role": "assistant",
                                   "content": f"{steps} The answer is {i + 3}."}]})
    return rows


def _losses(info: dict[str, Any]) -> list[float]:
    return [v for _, v in info["loss_history"]]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _same_adapters(a: Path, b: Path, rel: float = 0.1) -> None:
    """Every adapter tensor within `rel` (relative Frobenius norm) of the reference's. Loose on
    purpose, the per-step losses being the exact check: Adam divides each update by its
    gradient's running RMS, so a near-zero gradient whose last bits differ (another summation
    order) moves its weight by up to the learning rate either way, and lora_B starts at zero
    (measured: 3.8% on one v_proj lora_B after 3 steps, the rest closer). A wrong position or
    target would put the adapters (and the losses) far apart."""
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    worst = max((float((wa[k] - wb[k]).norm() / wa[k].norm().clamp(min=1e-12)), k) for k in wa)
    assert worst[0] < rel, worst


# --- the head at the loss positions: unit level ---------------------------------------------------


def test_next_token_mask_pairs_positions_with_their_labels() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    keep, targets = next_token_mask(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    assert targets.tolist() == [5, 6, 7, 8, 9, 10]


@pytest.mark.real
def test_compact_logits_equal_the_full_heads(real_model: Path) -> None:
    """`logits_to_keep` positions / mask through PEFT give the full forward's logits there."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert supports_logits_to_keep(model)
    ids = torch.randint(0, 1000, (2, 12))
    am = torch.ones_like(ids)
    am[1, 9:] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=am).logits
        pos = torch.tensor([[3, 4, 5], [6, 7, 8]])
        at, _ = logits_at(model, pos, input_ids=ids, attention_mask=am)
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[0, 2:5] = keep[1, 7:9] = True
        flat = masked_logits(model, keep, input_ids=ids, attention_mask=am)
    torch.testing.assert_close(at[0], full[0, 3:6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(at[1], full[1, 6:9], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flat, full[keep], atol=1e-4, rtol=1e-4)


# --- every lever, the reference path's losses and weights on the real model -----------------------


@pytest.mark.real
@pytest.mark.slow
def test_sft_fast_levers_keep_the_reference_losses(real_model: Path, tmp_path: Path) -> None:
    """Compact head and checkpointing off vs TRL's full fused head with checkpointing: the same
    loss at every step and the same adapter (fp32; only summation order differs)."""
    from distill.train.stage import TRAINERS

    rows = _rows()
    ref = TRAINERS["sft"](_cfg(real_model, compact_head=False, gradient_checkpointing=True),
                          None, rows, tmp_path / "ref")
    fast = TRAINERS["sft"](_cfg(real_model), None, rows, tmp_path / "fast")
    assert fast["steps"] == ref["steps"] == 3
    assert _losses(fast) == pytest.approx(_losses(ref), rel=1e-4, abs=1e-4)
    assert _losses(fast)[-1] < _losses(fast)[0]  # it learns
    _same_adapters(tmp_path / "ref", tmp_path / "fast")


def _teacher_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Path]:
    """The rows as the shipped demo teacher's generations with top-3 soft targets (its own
    place-value tokenizer: the cross-tokenizer case for a SmolLM2 student)."""
    from transformers import AutoTokenizer

    teacher = ROOT / "data" / "models" / "demo-teacher"
    tok = AutoTokenizer.from_pretrained(teacher)
    out = []
    for r in rows:
        text = r["messages"][-1]["content"]
        ids = [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        top = [[[t, -0.05], [(t + 3) % len(tok), -3.0], [(t + 7) % len(tok), -4.0]] for t in ids]
        out.append(r | {"token_ids": ids, "top_logprobs": top, "finish_reason": "stop",
                        "response": text})
    return out, teacher


@pytest.mark.real
@pytest.mark.slow
def test_cross_tokenizer_kd_compact_head_keeps_the_losses(real_model: Path, tmp_path: Path
                                                          ) -> None:
    from distill.train.stage import TRAINERS

    rows, teacher = _teacher_rows(_rows())
    kd = {"method": "kd", "kd": {"soft_targets": "stored", "cross_tokenizer": "align",
                                 "teacher_model": str(teacher)}}
    ref = TRAINERS["kd"](_cfg(real_model, compact_head=False, **kd), None, rows,
                         tmp_path / "ref")
    fast = TRAINERS["kd"](_cfg(real_model, **kd), None, rows, tmp_path / "fast")
    assert fast["cross_tokenizer"] == ref["cross_tokenizer"] == "align"
    assert _losses(fast) == pytest.approx(_losses(ref), rel=1e-4, abs=1e-4)
    _same_adapters(tmp_path / "ref", tmp_path / "fast")


@pytest.mark.real
@pytest.mark.slow
def test_local_teacher_kd_compact_head_keeps_the_losses(real_model: Path, tmp_path: Path
                                                        ) -> None:
    """Same-vocabulary KD on a local teacher's full logits: both student and teacher heads run
    at the completion positions only."""
    from distill.train.stage import TRAINERS

    kd = {"method": "kd", "max_steps": 2,
          "kd": {"soft_targets": "teacher", "teacher_model": str(real_model)}}
    ref = TRAINERS["kd"](_cfg(real_model, compact_head=False, **kd), None, _rows(4),
                         tmp_path / "ref")
    fast = TRAINERS["kd"](_cfg(real_model, **kd), None, _rows(4), tmp_path / "fast")
    assert _losses(fast) == pytest.approx(_losses(ref), rel=1e-4, abs=1e-4)
    assert fast["final_soft"] == pytest.approx(ref["final_soft"], rel=1e-4, abs=1e-5)


# --- what auto resolves to ----------------------------------------------------------------------


def test_bf16_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No bf16 flag: fp32 without timing anything; a flag: only if bf16 also measures faster."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx avx2 fma\n")
    assert precision.cpu_flags(info) == {"fpu", "avx", "avx2", "fma"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg(tmp_path)
    for flags, fast, want in (({"avx2"}, True, False), ({"avx2", "avx512_bf16"}, True, True),
                              ({"amx_bf16"}, False, False)):
        precision.cpu_bf16_fast.cache_clear()
        monkeypatch.setattr(precision, "cpu_flags", lambda f=flags: f)
        monkeypatch.setattr(precision, "matmul_gflops",
                            lambda dtype, fast=fast: 400.0 if (dtype == torch.bfloat16) == fast
                            else 100.0)
        assert precision.use_bf16(cfg) is want, flags
    precision.cpu_bf16_fast.cache_clear()
    assert precision.use_bf16(_cfg(tmp_path, bf16=True)) is True
    assert precision.use_bf16(_cfg(tmp_path, bf16=False)) is False


def test_checkpointing_auto_sizes_the_micro_batch(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    class Model:  # SmolLM2-135M's widths
        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)

    per_token = memory.activation_bytes_per_token(Model.config)
    assert 2.8e6 < per_token < 3.1e6  # measured: ~2.9 MB per token
    use = memory.use_activation_checkpointing
    assert use(_cfg(tmp_path, batch_size=8, max_length=256, gradient_checkpointing="auto"),
               Model()) is True        # 2,048 tokens: ~6 GB of activations
    assert use(_cfg(tmp_path, batch_size=8, max_length=128, gradient_checkpointing="auto"),
               Model()) is False       # 1,024 tokens: ~3 GB, under the 4 GB budget
    assert use(_cfg(tmp_path, batch_size=8, max_length=128, gradient_checkpointing="auto",
                    activation_memory_gb=2.0), Model()) is True
    assert use(_cfg(tmp_path, gradient_checkpointing=True), Model()) is True
    assert use(_cfg(tmp_path, gradient_checkpointing="auto"), None) is True

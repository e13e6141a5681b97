"""Training on a real pretrained LM (SmolLM2-135M): memory, saved config, base-model template,
and the EOS that closes the assistant turn when pad == eos."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from distill.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat
from distill.config import PipelineConfig

pytestmark = pytest.mark.real

WORDS = " ".join(f"step{i % 50} adds {i % 7}" for i in range(400))


def _cfg(student: Path, **train: Any) -> PipelineConfig:
    t = {"student": str(student), "max_steps": 2, "batch_size": 2, "max_length": 64,
         "learning_rate": 1e-4, "logging_steps": 10, "seed": 0} | train
    return PipelineConfig.model_validate({"name": "real", "seeds": {"path": "s.jsonl"},
                                          "train": t, "root": str(student.parent)})


def _rows(n: int = 4, answer_words: int = 8) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        answer = " ".join(WORDS.split()[: answer_words + 3 * i]) + f". The answer is {i}."
        rows.append({"id": f"r{i}", "seed_id": f"s{i}", "question": f"What is {i} + 0?",
                     "messages": [{"role": "user", "content": f"What is {i} + 0?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def _messages(rows: list[dict[str, Any]]) -> Dataset:
    return Dataset.from_list([{"messages": r["messages"]} for r in rows])


def _stored_topk(rows: list[dict[str, Any]], tok: Any) -> list[dict[str, Any]]:
    """Rows as a teacher with `top_logprobs: 2` would have written them."""
    out = []
    for r in rows:
        ids = tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
        ids = [*ids, tok.eos_token_id]
        top = [[[t, -0.1], [(t + 1) % 1000, -2.4]] for t in ids]
        out.append(r | {"token_ids": ids, "top_logprobs": top, "finish_reason": "stop",
                        "response": r["messages"][-1]["content"]})
    return out


def _saved_activation_bytes(model: Any, run: Any) -> int:
    """Bytes autograd keeps for the backward pass (parameters excluded) while `run()` runs."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def test_sft_lora_keeps_activations_off_the_heap(real_model: Path, tmp_path: Path) -> None:
    """The 8 GB peak of LoRA SFT at 512 tokens was the 30 layers' saved activations (~73 KB per
    token per layer, 40% of it LoRA dropout copies). With activation checkpointing (auto turns
    it on for long micro-batches) a layer keeps only its input, and TRL's fused head keeps no
    [batch, seq, vocab] logits."""
    from distill.train.sft import make_sft_trainer
    from distill.train.student import build_student, load_tokenizer

    cfg = _cfg(real_model, max_steps=1, max_length=128, batch_size=1,
               lora={"r": 8, "alpha": 16, "dropout": 0.05}, gradient_checkpointing=True,
               compact_head=False)
    tok = load_tokenizer(cfg)
    model = build_student(cfg, tok)
    trainer = make_sft_trainer(cfg, tok, model, _messages(_rows(1, answer_words=400)), tmp_path)
    tokens = len(trainer.train_dataset[0]["input_ids"])
    assert tokens == 128
    saved = _saved_activation_bytes(trainer.model, trainer.train)  # one optimizer step
    layers, vocab = model.config.num_hidden_layers, model.config.vocab_size
    per_token_layer = saved / tokens / layers
    assert per_token_layer < 8_000, f"{per_token_layer:.0f} bytes/token/layer saved"
    assert saved < tokens * vocab * 4  # not even one fp32 copy of the full-vocabulary logits


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_base_student_saves_the_template_it_was_trained_on(real_base_model: Path, tmp_path: Path,
                                                           method: str) -> None:
    """A base LM trains on the default template; the student carries it, generates with a KV
    cache (the Trainer sets use_cache false while training) and knows its final loss even with
    logging_steps > max_steps."""
    from transformers import AutoConfig, AutoTokenizer

    from distill.train.kd import train_kd
    from distill.train.kd_data import kd_examples
    from distill.train.sft import make_sft_trainer, train_sft
    from distill.train.student import build_student, load_tokenizer

    cfg = _cfg(real_base_model, method=method)
    rows = _rows(2)
    tok = load_tokenizer(cfg)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE  # the base tokenizer has none
    out = tmp_path / "student"
    if method == "sft":
        info = train_sft(cfg, _messages(rows), out)
        trainer = make_sft_trainer(cfg, tok, build_student(cfg, tok), _messages(rows),
                                   tmp_path / "work")
        prompts = [[i for i, lab in zip(r["input_ids"], r["labels"], strict=True) if lab == -100]
                   for r in trainer.train_dataset]
    else:
        rows = _stored_topk(rows, tok)
        info = train_kd(cfg, None, rows, out)
        examples, _ = kd_examples(rows, tok, max_length=cfg.train.max_length)
        prompts = [e.input_ids[: e.prompt_len] for e in examples]
    assert AutoConfig.from_pretrained(out).use_cache is True
    assert info["steps"] == 2 and isinstance(info["final_loss"], float)
    assert f"final training loss: {info['final_loss']}" in (out / "README.md").read_text()
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == DEFAULT_CHAT_TEMPLATE
    for row, trained in zip(rows, prompts, strict=True):
        text = render_chat(saved, row["messages"][:-1])
        assert saved(text, add_special_tokens=False)["input_ids"] == trained
        assert text.startswith("<|user|>\n") and text.endswith("<|assistant|>\n")


def test_eos_closing_the_turn_is_trained_when_pad_is_eos(real_model: Path, tmp_path: Path
                                                         ) -> None:
    """SmolLM2 pads with its EOS (<|im_end|>): a collator that masks pad ids would also mask the
    EOS that ends each answer, and the student would never learn to stop."""
    from distill.train.kd_data import KDCollator, kd_examples
    from distill.train.sft import make_sft_trainer
    from distill.train.student import build_student, load_tokenizer

    cfg = _cfg(real_model)
    tok = load_tokenizer(cfg)
    assert tok.pad_token_id == tok.eos_token_id
    rows = _rows(2)  # different lengths: the shorter row is padded
    trainer = make_sft_trainer(cfg, tok, build_student(cfg, tok), _messages(rows), tmp_path)
    sft = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    examples, _ = kd_examples(_stored_topk(rows, tok), tok, max_length=cfg.train.max_length)
    kd = KDCollator(tok.pad_token_id)(examples)
    for batch in (sft, kd):
        lengths = [int((lab != -100).sum()) for lab in batch["labels"]]
        assert lengths[0] != lengths[1]
        for labels in batch["labels"]:
            trained = labels[labels != -100].tolist()
            assert trained.count(tok.eos_token_id) == 1  # the turn's end; no padding
            assert tok.eos_token_id in trained[-2:]  # ChatML may close with "\n" after it


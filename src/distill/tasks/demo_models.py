"""The offline demo's models: two small Llamas, a plain training loop, greedy answers.

`teacher_config()` and `student_config()` (>= 20x fewer parameters) are the shipped models'
transformers configs; `train_causal_lm` is an AdamW + cosine loop without Trainer overhead (fast
on a CPU); `accuracy` scores a model on task rows with greedy, left-padded batches.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from distill.tasks import parse_answer
from distill.tasks.demo_data import prompt_ids
from distill.tasks.demo_tokenizer import TOKENIZER_VOCAB

MAX_NEW_TOKENS = 128
"""Enough for the longest gold solution (4 steps) with room to spare."""


def _llama(hidden: int, layers: int, heads: int, intermediate: int, vocab_size: int,
           kv_heads: int | None = None) -> dict[str, Any]:
    return {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads or heads,
        "intermediate_size": intermediate, "vocab_size": vocab_size,
        "max_position_embeddings": 512, "tie_word_embeddings": True, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_dropout": 0.0,
    }


def teacher_config(vocab_size: int = TOKENIZER_VOCAB, **overrides: Any) -> dict[str, Any]:
    """The shipped teacher's transformers config kwargs."""
    return {**_llama(192, 4, 6, 768, vocab_size), **overrides}


def student_config(vocab_size: int = TOKENIZER_VOCAB, **overrides: Any) -> dict[str, Any]:
    """The demo's compact student: >= 20x fewer parameters than `teacher_config()`."""
    return {**_llama(48, 2, 4, 192, vocab_size), **overrides}


def build_model(config: dict[str, Any], tok: Any, seed: int = 0) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type, **kwargs, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def train_causal_lm(model: Any, examples: Sequence[tuple[list[int], list[int]]], *,
                    epochs: float = 1.0, lr: float = 1e-3, batch_size: int = 32,
                    warmup_ratio: float = 0.05, weight_decay: float = 0.01, seed: int = 0,
                    pad_id: int = 0, log_every: int = 50, log: bool = True,
                    callback: Callable[[int], None] | None = None) -> dict[str, Any]:
    """A plain AdamW + cosine loop over padded batches (CPU-friendly; no Trainer overhead)."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = max(1, int(steps_per_epoch * epochs))
    warmup = int(total * warmup_ratio)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    from distill.teachers.engine import make_progress

    progress = make_progress()
    bar = progress.add_task("train", total=total, info="")
    if log:
        progress.start()
    model.train()
    order: list[int] = []
    t0, cpu0, step, running = time.perf_counter(), time.process_time(), 0, 0.0
    while step < total:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[:batch_size], order[batch_size:]
        batch = [examples[i] for i in idx]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (x, y) in enumerate(batch):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(y)] = torch.tensor(y)
            mask[r, : len(x)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        running = 0.9 * running + 0.1 * loss.item() if step > 1 else loss.item()
        progress.update(bar, completed=step, info=f"loss {running:.4f}")
        if log and (step % log_every == 0 or step == total):
            progress.console.print(f"  step {step}/{total} loss {running:.4f} "
                                   f"{time.perf_counter() - t0:.0f}s")
        if callback is not None and step % log_every == 0:
            callback(step)
            model.train()
    progress.stop()
    model.eval()
    # cpu_s / threads approximates wall time on an otherwise idle machine.
    return {"steps": total, "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - cpu0, 1), "loss": round(running, 4)}


def generate_answers(model: Any, tok: Any, questions: Sequence[str], batch_size: int = 128,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy completions (left-padded batches, longest prompts together)."""
    import torch

    order = sorted(range(len(questions)), key=lambda i: len(questions[i]))
    out: list[str] = [""] * len(questions)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        prompts = [prompt_ids(tok, questions[i]) for i in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        for r, i in enumerate(chunk):
            out[i] = tok.decode(gen[r, width:], skip_special_tokens=True).strip()
    return out


def accuracy(model: Any, tok: Any, rows: Sequence[dict], batch_size: int = 128) -> float:
    preds = generate_answers(model, tok, [r["question"] for r in rows], batch_size=batch_size)
    return sum(parse_answer(p) == str(r["answer"]) for p, r in zip(preds, rows, strict=True)) / len(
        rows)

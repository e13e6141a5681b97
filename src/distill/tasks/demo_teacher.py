"""The offline demo's tiny teacher: a local tokenizer, model configs, and a plain training loop.

The demo needs a teacher that runs anywhere with no hub access, so this module builds one from
scratch: a byte-level BPE tokenizer (every digit its own token, chat-role special tokens, a Jinja
chat template with ``{% generation %}`` markers so TRL's ``assistant_only_loss`` works) and a small
Llama trained on the gold chains of thought of `distill.tasks.arithmetic`. It is trained once and
shipped in ``data/models/demo-teacher``:

    python -m distill.tasks.demo_teacher --out data/models/demo-teacher     # ~10 min, 2 CPU cores

`student_config()` is the matching compact student (>= 20x fewer parameters) the demo pipeline
builds fresh and trains with TRL on the teacher's verified rationales.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from distill.tasks import make_task, parse_answer, prompt_text

PAD, END, USER, ASSISTANT, SYSTEM = "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, END, USER, ASSISTANT, SYSTEM]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% else %}<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TOKENIZER_VOCAB = 512
MAX_NEW_TOKENS = 128
"""Enough for the longest gold solution (4 steps) with room to spare."""


# --- tokenizer ---------------------------------------------------------------------------------

# Digits are tokenized with their place value ("abacus" digits): the normalizer rewrites a
# hundreds digit as a fullwidth digit and a tens digit as a subscript digit, and the decoder maps
# them back, so "127" is the three tokens 1(hundreds) 2(tens) 7 and decodes to "127" again. A tiny
# model can then line up the digits of two numbers by content instead of by counting positions,
# which is what makes carries learnable in minutes on a CPU. Other text round-trips unchanged.
HUNDREDS = "０１２３４５６７８９"
TENS = "₀₁₂₃₄₅₆₇₈₉"


def _place_value_normalizer() -> Any:
    from tokenizers import Regex, normalizers

    rules = [normalizers.Replace(Regex(f"{d}(?=[0-9][0-9](?![0-9]))"), HUNDREDS[d])
             for d in range(10)]
    rules += [normalizers.Replace(Regex(f"{d}(?=[0-9](?![0-9]))"), TENS[d]) for d in range(10)]
    return normalizers.Sequence(rules)


def _corpus(n_rows: int, seed: int) -> Iterator[str]:
    # Every number 0..999 a few times, so each place-value digit becomes one token.
    sweep = " ".join(str(n) for n in range(1000))
    yield from [sweep] * 10
    for row in make_task("arithmetic", "train", n_rows, seed):
        yield prompt_text(row["question"])
        yield row["solution"]


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = TOKENIZER_VOCAB,
                    n_rows: int = 4000, seed: int = 0) -> Any:
    """Train a byte-level BPE on task text (one token per digit and place) and save it.

    The full byte alphabet is kept, so any text round-trips; merges cover the task's words.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = _place_value_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.Sequence(
        [decoders.ByteLevel()]
        + [decoders.Replace(c, str(d)) for chars in (HUNDREDS, TENS) for d, c in enumerate(chars)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(n_rows, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END, pad_token=PAD, bos_token=None, unk_token=None,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM], model_max_length=1024,
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


# --- models ------------------------------------------------------------------------------------

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
    return {**_llama(256, 4, 8, 1024, vocab_size), **overrides}


def student_config(vocab_size: int = TOKENIZER_VOCAB, **overrides: Any) -> dict[str, Any]:
    """The demo's compact student: >= 20x fewer parameters than `teacher_config()`."""
    return {**_llama(64, 2, 4, 256, vocab_size), **overrides}


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


# --- data ----------------------------------------------------------------------------------------

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


# --- training and evaluation --------------------------------------------------------------------

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
        if log and (step % log_every == 0 or step == total):
            print(f"  step {step}/{total} loss {running:.4f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
        if callback is not None and step % log_every == 0:
            callback(step)
            model.train()
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


# --- the shipped teacher --------------------------------------------------------------------------

def train_demo_teacher(out_dir: str | Path, n_train: int = 20000, epochs: float = 1.0,
                       lr: float = 1e-3, batch_size: int = 32, n_eval: int = 500, seed: int = 0,
                       config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the teacher on gold solutions, save model + tokenizer (safetensors) to `out_dir`."""
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = build_tokenizer(out, seed=seed)
    cfg = config or teacher_config(len(tok))
    model = build_model(cfg, tok, seed=seed)
    rows = make_task("arithmetic", "train", n_train, seed)
    stats = train_causal_lm(model, encode_sft(tok, rows, "cot"), epochs=epochs, lr=lr,
                            batch_size=batch_size, seed=seed, pad_id=tok.pad_token_id)
    test = make_task("arithmetic", "test", n_eval, seed)
    acc = accuracy(model, tok, test)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    info = {"params": count_params(model), "config": cfg, "n_train": n_train, "epochs": epochs,
            "lr": lr, "batch_size": batch_size, "seed": seed, "train": stats,
            "test_accuracy": acc, "n_test": n_eval, "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/models/demo-teacher")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    info = train_demo_teacher(args.out, n_train=args.n_train, epochs=args.epochs, lr=args.lr,
                              batch_size=args.batch_size, n_eval=args.n_eval, seed=args.seed)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()

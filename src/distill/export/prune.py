"""Structured pruning before export, then a short recovery run — one step (`export.prune`).

Two cuts, both measured on a few rows of the run's SFT set:

- whole decoder layers, by block influence BI = 1 − cos(layer input, layer output) averaged over
  tokens (ShortGPT): a layer that barely changes its input is the cheapest to remove;
- MLP intermediate channels, by mean |act(gate)·up| × ‖down-projection column‖ (the channel's
  contribution to the MLP output), the same count kept in every layer.

Then `recover_steps` AdamW steps on the SFT rows: `kd_alpha` × cross-entropy on the assistant
tokens + (1 − kd_alpha) × KL(unpruned teacher ‖ pruned student) on the same tokens.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from distill.config import ConfigError, PruneConfig


def _layers(model: Any) -> Any:
    try:
        return model.model.layers
    except AttributeError:
        raise ConfigError("export.prune: the student has no model.layers (unsupported "
                          "architecture for structured pruning)") from None


def encode_rows(tok: Any, rows: list[dict[str, Any]], max_length: int
                ) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per conversation, via the chat template."""
    out = []
    for r in rows:
        msgs = r["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = tok.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs[: last + 1], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"][:max_length]
        out.append((ids, min(len(p_ids), len(ids))))
    return out


def _batch(items: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, n_prompt) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def layer_importance(model: Any, batches: list[dict[str, torch.Tensor]]
                     ) -> tuple[list[float], list[torch.Tensor]]:
    """Block influence per layer, and mean |activation| per MLP channel per layer."""
    layers = _layers(model)
    bi = [0.0] * len(layers)
    chan = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    count = [0]
    mask_holder: dict[str, torch.Tensor] = {}

    def layer_hook(i: int) -> Any:
        def hook(_m: Any, args: Any, kwargs: Any, out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            keep = mask_holder["mask"].bool()
            bi[i] += float((1 - cos)[keep].sum())
        return hook

    def down_hook(i: int) -> Any:
        def hook(_m: Any, args: Any) -> None:
            a = args[0].abs().float()
            keep = mask_holder["mask"].bool()
            chan[i] += a[keep].sum(0)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
    try:
        for b in batches:
            mask_holder["mask"] = b["attention_mask"]
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            count[0] += int(b["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    n = max(count[0], 1)
    return [v / n for v in bi], [c / n for c in chan]


def drop_layers(model: Any, drop: list[int]) -> None:
    layers = _layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in set(drop)]
    for new_idx, layer in enumerate(kept):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by it
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    model.model.layers = torch.nn.ModuleList(kept)
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in set(drop)]
    cfg.num_hidden_layers = len(kept)


def _sliced_linear(lin: torch.nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None
                   ) -> torch.nn.Linear:
    w = lin.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data[rows] if rows is not None else lin.bias.data)
    return new


def prune_channels(model: Any, act: list[torch.Tensor], keep_fraction: float) -> int:
    layers = _layers(model)
    inter = layers[0].mlp.down_proj.in_features
    keep = math.ceil(inter * keep_fraction)
    if keep >= 32:
        keep = min(inter, math.ceil(keep / 32) * 32)  # quantization blocks want multiples of 32
    for layer, a in zip(layers, act, strict=True):
        mlp = layer.mlp
        score = a * mlp.down_proj.weight.data.float().norm(dim=0)
        idx = torch.sort(torch.topk(score, keep).indices).values
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, idx, None)
        mlp.up_proj = _sliced_linear(mlp.up_proj, idx, None)
        mlp.down_proj = _sliced_linear(mlp.down_proj, None, idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
    model.config.intermediate_size = keep
    return keep


def recover(student: Any, teacher: Any, data: list[tuple[list[int], int]], pad_id: int,
            p: PruneConfig, seed: int) -> list[float]:
    """Short KD + CE run on the assistant tokens; returns the loss per step."""
    if p.recover_steps == 0 or not data:
        return []
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=p.learning_rate)
    student.train()
    losses = []
    for _ in range(p.recover_steps):
        idx = torch.randint(0, len(data), (min(p.batch_size, len(data)),), generator=gen)
        b = _batch([data[int(i)] for i in idx], pad_id)
        out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits = out.logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        on = labels != -100
        ce = torch.nn.functional.cross_entropy(logits[on], labels[on])
        loss = p.kd_alpha * ce
        if p.kd_alpha < 1:
            with torch.no_grad():
                t_logits = teacher(input_ids=b["input_ids"],
                                   attention_mask=b["attention_mask"]).logits[:, :-1].float()
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits[on], -1),
                                            torch.log_softmax(t_logits[on], -1),
                                            log_target=True, reduction="batchmean")
            loss = loss + (1 - p.kd_alpha) * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
    student.eval()
    return losses


@torch.no_grad()
def eval_loss(model: Any, data: list[tuple[list[int], int]], pad_id: int, bs: int) -> float:
    total, n = 0.0, 0
    for i in range(0, len(data), bs):
        b = _batch(data[i: i + bs], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        on = labels != -100
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1][on].float(), labels[on], reduction="sum"))
        n += int(on.sum())
    return round(total / max(n, 1), 4)


def prune_and_recover(model: Any, tok: Any, rows: list[dict[str, Any]], p: PruneConfig,
                      seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Return (pruned + recovered copy of `model`, a summary for export.json)."""
    torch.manual_seed(seed)
    if not rows:
        raise ConfigError("export.prune: the SFT set is empty; pruning needs it for calibration "
                          "and recovery")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = encode_rows(tok, rows, p.max_length)
    calib = data[: p.calib_rows]
    batches = [_batch(calib[i: i + p.batch_size], pad_id)
               for i in range(0, len(calib), p.batch_size)]
    teacher = model.eval()
    student = copy.deepcopy(model).eval()
    params_before = sum(t.numel() for t in student.parameters())
    n_layers = len(_layers(student))
    bi, act = layer_importance(student, batches)
    summary: dict[str, Any] = {"layers_before": n_layers, "params_before": params_before,
                               "block_influence": [round(b, 5) for b in bi],
                               "loss_before": eval_loss(teacher, calib, pad_id, p.batch_size)}
    drop = sorted(sorted(range(n_layers), key=lambda i: bi[i])[: min(p.drop_layers,
                                                                     n_layers - 1)])
    if p.ffn_keep < 1:
        summary["intermediate_before"] = student.config.intermediate_size
        summary["intermediate_after"] = prune_channels(student, act, p.ffn_keep)
    if drop:
        drop_layers(student, drop)
    summary |= {"dropped_layers": drop, "layers_after": len(_layers(student)),
                "loss_pruned": eval_loss(student, calib, pad_id, p.batch_size)}
    losses = recover(student, teacher, data, pad_id, p, seed)
    summary |= {"recover_steps": len(losses), "recover_loss_first": losses[0] if losses else None,
                "recover_loss_last": losses[-1] if losses else None,
                "loss_after": eval_loss(student, calib, pad_id, p.batch_size),
                "params_after": sum(t.numel() for t in student.parameters())}
    return student, summary

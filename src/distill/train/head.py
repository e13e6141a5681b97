"""The LM head only where the loss is (`train.compact_head`).

A causal LM's forward projects every position onto the vocabulary, but SFT and KD score only the
completion tokens: the prompt (chat template, system prompt, question) and the padding are
projected and then thrown away. On SmolLM2-135M the 49,152-column head is ~20% of the model's
FLOPs per token, and its log-softmax over `[tokens, vocab]` fp32 temporaries is the largest block
of memory traffic of a CPU training step. transformers (5.x) slices the hidden states before the
head when a forward is given `logits_to_keep` as a `[batch, positions]` index tensor or a
`[batch, seq]` boolean mask, so the model is still called through its wrappers (PEFT, DDP,
accelerate) and only the kept positions reach the head. Same loss, same gradients
(`tests/test_train_real.py`); architectures without the argument fall back to full logits.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from distill.train.losses import gather_positions


def _unwrap(model: Any) -> Any:
    """The transformers model under DDP (`.module`) and PEFT (`get_base_model()`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


_TAKES_LOGITS_TO_KEEP: dict[type, bool] = {}


def supports_logits_to_keep(model: Any) -> bool:
    """Whether the (wrapped) model's forward slices hidden states before its LM head."""
    cls = type(_unwrap(model))
    if cls not in _TAKES_LOGITS_TO_KEEP:
        try:
            takes = "logits_to_keep" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            takes = False
        _TAKES_LOGITS_TO_KEEP[cls] = takes
    return _TAKES_LOGITS_TO_KEEP[cls]


def logits_at(model: Any, positions: torch.Tensor, *, compact: bool = True,
              **inputs: Any) -> tuple[torch.Tensor, Any]:
    """The logits at `positions` (`[B, C]`, the position whose logits predict each completion
    token) → `([B, C, V], model outputs)`; only those positions go through the LM head when
    `compact` and the model supports it."""
    if compact and supports_logits_to_keep(model):
        out = model(**inputs, logits_to_keep=positions)
        return out.logits, out
    out = model(**inputs)
    return gather_positions(out.logits, positions), out


def next_token_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For causal-LM `labels` `[B, L]` (-100 = no loss): the positions whose logits predict a
    labelled token (a `[B, L]` bool mask) and those tokens, flattened in the same order."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep, labels[:, 1:][labels[:, 1:] != -100]


def masked_logits(model: Any, keep: torch.Tensor, *, compact: bool = True, **inputs: Any
                  ) -> torch.Tensor:
    """The logits at the True positions of `keep` (`[B, L]`), flattened to `[N, V]`."""
    if compact and supports_logits_to_keep(model):
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[keep]

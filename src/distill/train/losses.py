"""Distillation losses: soft targets with temperature, hard-token CE, hidden-state transfer.

Pure tensor functions, shared by the offline KD trainer (`kd.py`) and on-policy GKD (`gkd.py`).
Shapes: `[B, C, V]` logits at the C completion positions of B sequences, `[B, C]` masks.

The divergences follow TRL's GKD convention (`generalized_jsd_loss`): beta = 0 is the forward
KL(teacher || student), beta = 1 the reverse KL(student || teacher), and in between the
generalized JSD  beta * KL(p || m) + (1 - beta) * KL(q || m)  with m = beta * p + (1 - beta) * q.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

# A finite stand-in for log(0): -inf would turn 0 * (-inf - x) into NaN inside the KL sums.
NEG = -1e9

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def divergence_beta(divergence: Divergence, beta: float) -> float:
    """The generalized-JSD beta of a named divergence."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": beta}[divergence]


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dimension, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0, support: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Per-position divergence between softmax(teacher / T) and softmax(student / T).

    `support` (bool, same shape as the logits) restricts both distributions to the entries where
    it is True, renormalized there: the top-k approximation. Teacher "logits" may be
    log-probabilities (a constant shift changes nothing after the softmax). Returns `[...]`, the
    logits' shape without the last dimension. Computed in float32.
    """
    import torch

    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if support is not None:
        s = s.masked_fill(~support, NEG)
        t = t.masked_fill(~support, NEG)
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]),
                            dim=0)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True; 0 (with a gradient path) when nothing is."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class KDLoss:
    loss: torch.Tensor
    ce: torch.Tensor
    """Hard-token cross-entropy at T = 1 (the SFT loss)."""
    soft: torch.Tensor
    """The divergence at temperature T, before the T^2 and (1 - alpha) factors."""


def topk_divergence(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
                    topk_ids: torch.Tensor, valid: torch.Tensor, beta: float,
                    temperature: float) -> torch.Tensor:
    """Per-position divergence against a teacher known only by its top-k log-probabilities.

    The teacher side is softmax(logprob / T) renormalized over its k tokens (`valid` masks unused
    slots), i.e. a teacher that puts no mass outside its top-k. The student side is its full
    distribution softmax(logits / T), read at the same k ids plus one "rest of the vocabulary"
    bucket — so forward KL and the generalized JSD are the exact full-vocabulary divergences
    against that renormalized teacher, and they push the student's tail mass down. Reverse KL
    (beta = 1) would be infinite against a teacher with an empty tail: there the student is
    renormalized over the k tokens as well, and the tail is left to the hard-token CE.
    """
    import torch

    t = temperature
    log_p = torch.log_softmax((teacher_logprobs.float() / t).masked_fill(~valid, NEG), dim=-1)
    log_q_all = torch.log_softmax(student_logits.float() / t, dim=-1)
    log_q = log_q_all.gather(-1, topk_ids).masked_fill(~valid, NEG)
    if beta == 1.0:
        return generalized_jsd(log_q, log_p, 1.0, support=valid)
    in_k = torch.logsumexp(log_q, dim=-1, keepdim=True)
    # log(1 - q(top-k)), clamped: a student with all its mass in the top-k has an empty bucket.
    log_rest = torch.log(torch.clamp(-torch.expm1(in_k), min=1e-30))
    empty = torch.full_like(log_rest, NEG)
    return generalized_jsd(torch.cat([log_q, log_rest], -1), torch.cat([log_p, empty], -1), beta)


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
            soft_mask: torch.Tensor, *, alpha: float, temperature: float, beta: float,
            topk_ids: torch.Tensor | None = None, topk_valid: torch.Tensor | None = None
            ) -> KDLoss:
    """alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher_T || student_T).

    student_logits `[B, C, V]` predict `labels` `[B, C]` (-100 = not trained). The soft term is
    averaged over positions where `soft_mask` is True (the positions with a teacher
    distribution; a subset of the labelled ones), the CE over labelled positions.

    Full-vocabulary teacher: `teacher_logits` `[B, C, V]`. Stored top-k teacher: `teacher_logits`
    `[B, C, K]` holds the teacher's log-probabilities of the token ids `topk_ids` `[B, C, K]`
    (`topk_valid` masks unused slots when a position has fewer than k); see `topk_divergence`.
    """
    import torch

    ce = torch.nn.functional.cross_entropy(
        student_logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
        reduction="none").view_as(labels)
    ce = masked_mean(ce, labels != -100)
    if topk_ids is not None:
        valid = (topk_valid if topk_valid is not None
                 else torch.ones_like(topk_ids, dtype=torch.bool))
        d = topk_divergence(student_logits, teacher_logits, topk_ids, valid, beta, temperature)
    else:
        d = generalized_jsd(student_logits, teacher_logits, beta, temperature)
    soft = masked_mean(d, soft_mask & (labels != -100))
    loss = alpha * ce + (1 - alpha) * temperature**2 * soft
    return KDLoss(loss=loss, ce=ce, soft=soft)


def hidden_state_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                      projection: torch.nn.Module, mask: torch.Tensor,
                      kind: Literal["mse", "cosine"] = "mse") -> torch.Tensor:
    """Distance between projection(student hidden) and the teacher's hidden state.

    `[B, C, d_s]` and `[B, C, d_t]` at the same positions; mse averages over positions and
    dimensions, cosine is 1 - cos per position; both over the positions where `mask` is True.
    """
    import torch

    weight = projection.weight
    assert isinstance(weight, torch.Tensor)
    proj = projection(student_hidden.to(weight.dtype)).float()
    target = teacher_hidden.float()
    if kind == "mse":
        per_pos = (proj - target).pow(2).mean(-1)
    else:
        per_pos = 1.0 - torch.nn.functional.cosine_similarity(proj, target, dim=-1)
    return masked_mean(per_pos, mask)


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`values[b, positions[b, c], :]` → `[B, C, D]` for `values` `[B, L, D]`."""
    index = positions.unsqueeze(-1).expand(-1, -1, values.size(-1))
    return values.gather(1, index)

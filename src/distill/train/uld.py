"""Universal logit distillation (ULD, Boizard et al. 2024): distillation with no shared vocabulary.

Two distributions over different vocabularies cannot be compared token by token, but their
*sorted* probability vectors can: ULD is the L1 distance between the teacher's and the student's
probabilities, each sorted in descending order and padded with zeros to the same length (the
closed form of a Wasserstein distance between the two when every token is as far from every
other). It asks the student to be as confident, and to spread its doubt as widely, as the
teacher — not to put the mass on the same tokens. It is what `xtok` falls back to at positions
the alignment cannot map, and the whole soft loss with `cross_tokenizer: uld`.

TRL's experimental GOLD trainer carries ULD (`trl.experimental.gold.gold_trainer.ULDLoss`), but
as a module bound to a `GOLDConfig` that slices each sequence's answer span itself, with the
sorted-L1 step inline, and importing it loads the whole GOLD/SFT/vLLM trainer stack (~10 s). Our
positions are already gathered (`[B, C, V]` at completion positions, a `[B, C]` mask), and the
stored teacher is a sparse top-k, so this module holds the tensor functions; tests check them
against TRL's `ULDLoss` on the same inputs.

Two additions over the plain sorted L1:

- a sparse teacher (stored top-k, renormalized over its k entries) against the full student:
  `sorted_l1` needs only the student's top-k, because past rank k one side is zero-padded and
  the other's tail sum is its total minus its top-k: the exact value, at O(V) instead of a
  full sort;
- span merging (TRL's "observed" strategy): where one side spells a span with several tokens,
  its first position's distribution is scaled by the probabilities of the later tokens it
  actually produced (`span_log_scale`), so a teacher that needed three tokens for "127" is not
  compared at face value with a student that needed one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distill.train.losses import NEG, masked_mean

if TYPE_CHECKING:
    import torch


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_r |sort(p)_r - sort(q)_r| over the last dimension, both sorted descending and the
    shorter zero-padded: `[..., V]` and `[..., K]` → `[...]`. Inputs need not sum to one."""
    import torch

    m = min(p.size(-1), q.size(-1))
    a = torch.topk(p, m, dim=-1).values
    b = torch.topk(q, m, dim=-1).values
    tails = (p.sum(-1) - a.sum(-1)) + (q.sum(-1) - b.sum(-1))
    return (a - b).abs().sum(-1) + tails


def span_log_scale(logprobs: torch.Tensor, labels: torch.Tensor, first: torch.Tensor
                   ) -> torch.Tensor:
    """Per span's first position, log of the product of the probabilities of the tokens the
    sequence actually has at the span's later positions (0 elsewhere).

    `logprobs` `[B, C, V]` (log-softmax at the positions), `labels` `[B, C]` (the tokens those
    positions predict; -100 ignored), `first` `[B, C]`: the index of each position's span's
    first position (-1: no span)."""
    import torch

    c = torch.arange(first.size(1), device=first.device).expand_as(first)
    inner = (first >= 0) & (first != c) & (labels != -100)
    lp = logprobs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(inner, lp, torch.zeros_like(lp))
    return torch.zeros_like(lp).scatter_add(1, first.clamp_min(0), lp)


def uld_topk(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
             teacher_valid: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
             student_log_scale: torch.Tensor | None = None,
             teacher_log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Mean ULD over the positions where `mask` is True, against a stored top-k teacher.

    `student_logits` `[B, C, V]`; `teacher_logprobs` `[B, C, K]` in the teacher's own vocabulary
    (ids are not needed), `teacher_valid` `[B, C, K]` marking reported entries. The teacher is
    softmax(logprob / T) renormalized over its entries, as in `losses.topk_divergence`; the
    student is its full softmax(logits / T). Log-scales `[B, C]` (`span_log_scale`) multiply
    either side's distribution at merged spans."""
    import torch

    t = temperature
    tp = torch.softmax((teacher_logprobs.float() / t).masked_fill(~teacher_valid, NEG), dim=-1)
    tp = tp * teacher_valid
    sp = torch.softmax(student_logits.float() / t, dim=-1)
    if student_log_scale is not None:
        sp = sp * student_log_scale.unsqueeze(-1).exp()
    if teacher_log_scale is not None:
        tp = tp * teacher_log_scale.unsqueeze(-1).exp()
    d = sorted_l1(sp, tp)
    return masked_mean(d, mask & teacher_valid.any(-1))


def uld_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               *, temperature: float = 1.0, student_log_scale: torch.Tensor | None = None,
               teacher_log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Mean ULD over the positions where `mask` is True, against a full teacher distribution:
    `[B, C, V_s]` and `[B, C, V_t]` logits at positions paired by the caller (the teacher
    position that starts where each student position starts: `Alignment.teacher_pos`)."""
    import torch

    sp = torch.softmax(student_logits.float() / temperature, dim=-1)
    tp = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    if student_log_scale is not None:
        sp = sp * student_log_scale.unsqueeze(-1).exp()
    if teacher_log_scale is not None:
        tp = tp * teacher_log_scale.unsqueeze(-1).exp()
    return masked_mean(sorted_l1(sp, tp), mask)

"""The training set: kept generations as chat `messages`, and its dataset card."""

from __future__ import annotations

from typing import Any

from distill.config import PipelineConfig


def assistant_text(row: dict[str, Any]) -> str:
    return (row.get("rationale") or row.get("response") or "").strip()


# Carried into the sft set when the teacher reported them, for soft-target training (kd_data.py):
# the teacher's own tokens, its top-k (token, logprob) per token, and how its text ended.
SOFT_TARGET_FIELDS = ("token_ids", "top_logprobs", "response", "finish_reason")


def sft_rows(kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in kept:
        prompt = list(r.get("messages") or [{"role": "user", "content": r["question"]}])
        row = {
            "id": r["id"], "seed_id": r.get("seed_id"), "question": r["question"],
            "gold": r.get("gold"), "answer": r.get("answer"),
            "messages": [*prompt, {"role": "assistant", "content": assistant_text(r)}],
        }
        if r.get("top_logprobs") or r.get("token_ids"):
            row |= {k: r.get(k) for k in SOFT_TARGET_FIELDS}
        out.append(row)
    return out


def label_only_rows(sft: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ablation: same prompts, the assistant states only the answer (gold when known)."""
    seen, out = set(), []
    for r in sft:
        if r["seed_id"] in seen:
            continue
        seen.add(r["seed_id"])
        from distill.answers import extract_answer

        label = extract_answer(r["gold"]) if r.get("gold") else r.get("answer")
        if label is None:
            continue
        msgs = [m for m in r["messages"] if m["role"] != "assistant"]
        out.append(r | {"messages": [*msgs, {"role": "assistant",
                                             "content": f"The answer is {label}."}]})
    return out


def dataset_card(cfg: PipelineConfig, funnel: dict[str, Any], n_rows: int) -> str:
    """sft/README.md: Hub metadata (licences, teacher, counts, funnel, command) + prose."""
    from distill.formats import dataset_card as card

    return card(cfg, funnel, n_rows)

"""The training set: kept generations as chat `messages`, and its dataset card."""

from __future__ import annotations

from typing import Any

import yaml

from distill.config import PipelineConfig


def assistant_text(row: dict[str, Any]) -> str:
    return (row.get("rationale") or row.get("response") or "").strip()


def sft_rows(kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in kept:
        prompt = list(r.get("messages") or [{"role": "user", "content": r["question"]}])
        out.append({
            "id": r["id"], "seed_id": r.get("seed_id"), "question": r["question"],
            "gold": r.get("gold"), "answer": r.get("answer"),
            "messages": [*prompt, {"role": "assistant", "content": assistant_text(r)}],
        })
    return out


def label_only_rows(sft: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ablation: same prompts, the assistant states only the answer (gold when known)."""
    seen, out = set(), []
    for r in sft:
        if r["seed_id"] in seen:
            continue
        seen.add(r["seed_id"])
        from distill.filter.verify import extract_answer

        label = extract_answer(r["gold"]) if r.get("gold") else r.get("answer")
        if label is None:
            continue
        msgs = [m for m in r["messages"] if m["role"] != "assistant"]
        out.append(r | {"messages": [*msgs, {"role": "assistant",
                                             "content": f"The answer is {label}."}]})
    return out


def dataset_card(cfg: PipelineConfig, funnel: dict[str, Any], n_rows: int) -> str:
    meta = {
        "license": "other",
        "task_categories": ["text-generation"],
        "tags": ["distill", "synthetic", "chain-of-thought" if cfg.generate.task == "cot"
                 else "instruction-tuning"],
        "size_categories": ["n<1K" if n_rows < 1000 else "1K<n<10K" if n_rows < 10000
                            else "10K<n<100K"],
        "configs": [{"config_name": "default", "data_files": "sft.jsonl"}],
    }
    steps = "\n".join(f"| {f['name']} | {f['in']} | {f['out']} | "
                      f"{', '.join(f'{k}: {v}' for k, v in f['dropped'].items()) or '-'} |"
                      for f in funnel["filters"])
    seeds = cfg.seeds.path or f"procedural task `{cfg.seeds.task.name}`"  # type: ignore[union-attr]
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
        f"# {cfg.name}: distilled training set\n\n"
        f"{n_rows} conversations (`messages` column) distilled by `distill` from teacher "
        f"`{cfg.teacher.backend}:{cfg.teacher.model}` on seeds from {seeds}.\n\n"
        f"- task: {cfg.generate.task}; samples per prompt: {cfg.generate.samples_per_prompt}; "
        f"temperature: {cfg.generate.temperature}\n"
        f"- teacher terms: check the teacher's licence/terms of use before redistributing.\n\n"
        f"## Funnel\n\n| filter | in | out | dropped |\n|---|---|---|---|\n{steps}\n\n"
        f"## Reproduce\n\n```\ndistill run pipelines/{cfg.name}.yaml\n```\n"
    )

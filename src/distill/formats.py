"""The curated training set in the formats other tools read, and its dataset card.

`sft/` holds, beside the canonical `sft.jsonl` (a `messages` column) and the `datasets` copy:

    sft.parquet              the same rows, columnar (pandas, polars, DuckDB, the Hub viewer)
    prompt_completion.jsonl  {"id", "prompt", "completion"[, "system"]}: plain strings (TRL's
                             standard prompt-completion format, OpenAI's legacy fine-tuning one)
    alpaca.jsonl             {"instruction", "input", "output"[, "system"]} (Alpaca, LLaMA-Factory)
    README.md                the dataset card: YAML metadata (licences, teacher and the models
                             it was served as, Batch API ids, counts, funnel, the command) and
                             the same in prose

The last user turn is the prompt and the last assistant turn the completion; a system message,
when the pipeline has one, goes to its own `system` field.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from distill.config import PipelineConfig
from distill.records import atomic_path, write_jsonl

FORMAT_FILES = {"parquet": "sft.parquet", "prompt_completion": "prompt_completion.jsonl",
                "alpaca": "alpaca.jsonl"}

# First words of a LICENSE file → the Hub's licence id.
_LICENSE_HEADS = {
    "mit license": "mit", "apache license": "apache-2.0", "bsd 3-clause": "bsd-3-clause",
    "bsd 2-clause": "bsd-2-clause", "creative commons attribution 4.0": "cc-by-4.0",
    "attribution 4.0 international": "cc-by-4.0", "attribution-sharealike 4.0": "cc-by-sa-4.0",
    "cc0 1.0": "cc0-1.0", "gnu general public license": "gpl-3.0",
}


def _turn(messages: list[dict[str, Any]], role: str) -> str:
    turns = [m for m in messages if m.get("role") == role]
    return str(turns[-1].get("content") or "") if turns else ""


def _system(messages: list[dict[str, Any]]) -> dict[str, str]:
    text = _turn(messages, "system")
    return {"system": text} if text else {}


def prompt_completion_rows(sft: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": r.get("id"), **_system(r["messages"]), "prompt": _turn(r["messages"], "user"),
             "completion": _turn(r["messages"], "assistant")} for r in sft]


def alpaca_rows(sft: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"instruction": _turn(r["messages"], "user"), "input": "",
             "output": _turn(r["messages"], "assistant"), **_system(r["messages"])} for r in sft]


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """Same encoding as the stage's `datasets` copy (ragged columns as JSON text)."""
    from datasets import Dataset

    from distill.io import to_dataset

    ds = to_dataset(rows) if rows else Dataset.from_dict({"id": [], "messages": []})
    with atomic_path(path) as tmp:
        ds.to_parquet(str(tmp))


def write_formats(sft_dir: Path, sft: list[dict[str, Any]]) -> dict[str, str]:
    """Write the extra formats into `sft_dir`; return {format: file name}."""
    write_parquet(sft_dir / FORMAT_FILES["parquet"], sft)
    write_jsonl(sft_dir / FORMAT_FILES["prompt_completion"], prompt_completion_rows(sft))
    write_jsonl(sft_dir / FORMAT_FILES["alpaca"], alpaca_rows(sft))
    return dict(FORMAT_FILES)


# ------------------------------------------------------------------------------ dataset card


def seed_license(cfg: PipelineConfig) -> str:
    """`seeds.license`, else what a LICENSE file beside the seed file names, else "unknown"."""
    if cfg.seeds.license:
        return cfg.seeds.license
    if cfg.seeds.path:
        folder = cfg.resolve(cfg.seeds.path).parent
        for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "COPYING"):
            f = folder / name
            if f.is_file():
                head = " ".join(f.read_text(errors="replace").split()[:12]).casefold()
                for key, spdx in _LICENSE_HEADS.items():
                    if key in head:
                        return spdx
                return f"see {name}"
    return "unknown"


def invocation(cfg: PipelineConfig) -> str:
    """The command that made this run: argv when run from the `distill` CLI, else the recipe."""
    argv = list(sys.argv)
    prog = Path(argv[0]).name if argv else ""
    if prog in ("distill", "cli.py") or prog.startswith("distill"):
        return shlex.join(["distill", *argv[1:]])
    return f"distill run pipelines/{cfg.name}.yaml"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def teacher_provenance(rows: Iterable[dict[str, Any]],
                       batch_record: Path | None = None) -> dict[str, Any]:
    """Who answered: the distinct `teacher_served` of `rows` with their row counts (most rows
    first; `unreported`: rows whose server named no model), and the ids of the Batch API
    batches in `batch_record` (`generate/batches.json`), when the run used the Batch API."""
    counts = Counter(r.get("teacher_served") for r in rows)
    served = [{"model": str(m), "rows": n}
              for m, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
              if m is not None]
    batches: list[str] = []
    if batch_record is not None and batch_record.is_file():
        data = json.loads(batch_record.read_text())
        batches = [str(b["id"]) for b in data.get("batches") or []
                   if isinstance(b, dict) and b.get("id")]
    return {"served": served, "unreported": counts.get(None, 0), "batches": batches}


def card_metadata(cfg: PipelineConfig, funnel: dict[str, Any], n_rows: int,
                  provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's YAML header: Hub fields first, then what `distill` knows about the data.
    `provenance` (`teacher_provenance`) adds `teacher_served` and `teacher_batches`."""
    task = cfg.generate.task
    seeds = cfg.seeds.path or f"task:{cfg.seeds.task.name}"  # type: ignore[union-attr]
    filters = [f["name"] for f in funnel.get("filters", [])]
    meta: dict[str, Any] = {
        "license": "other",
        "license_name": "distilled-synthetic",
        "license_details": ("Seed data under its own licence (seed_license); teacher outputs "
                            "under the teacher's terms (teacher_terms)."),
        "task_categories": ["text-generation"],
        "tags": ["distill", "synthetic",
                 "chain-of-thought" if task == "cot" else "instruction-tuning"],
        "size_categories": [_size_category(n_rows)],
        "configs": [
            {"config_name": "default", "data_files": "sft.jsonl", "default": True},
            {"config_name": "prompt_completion", "data_files": FORMAT_FILES["prompt_completion"]},
            {"config_name": "alpaca", "data_files": FORMAT_FILES["alpaca"]},
        ],
        "pipeline": cfg.name,
        "seed_source": cfg.seeds.source or seeds,
        "seed_license": seed_license(cfg),
        "teacher": f"{cfg.teacher.backend}:{cfg.teacher.model}",
        "teacher_terms": cfg.teacher.terms or "unspecified: check the teacher's licence or "
                                              "terms of use before redistributing",
        "generation": {"task": task, "prompt": cfg.generate.prompt,
                       "temperature": cfg.generate.temperature,
                       "samples_per_prompt": cfg.generate.samples_per_prompt,
                       "adaptive": (cfg.generate.adaptive.model_dump()
                                    if cfg.generate.adaptive else None)},
        "counts": {"generated": funnel.get("in", 0), "kept": funnel.get("out", 0),
                   "rows": n_rows},
        "filters": filters,
        "funnel": [{"filter": f["name"], "in": f["in"], "out": f["out"],
                    "dropped": dict(f.get("dropped") or {})} for f in funnel.get("filters", [])],
        "command": invocation(cfg),
    }
    if provenance is None:
        return meta
    extra: dict[str, Any] = {}
    if provenance.get("served"):
        extra["teacher_served"] = list(provenance["served"])
        if provenance.get("unreported"):
            extra["teacher_served"].append({"model": None, "rows": provenance["unreported"]})
    if provenance.get("batches"):
        extra["teacher_batches"] = list(provenance["batches"])
    at = list(meta).index("teacher_terms") + 1  # beside the configured teacher
    items = list(meta.items())
    return dict(items[:at] + list(extra.items()) + items[at:])


def _provenance_prose(meta: dict[str, Any]) -> str:
    parts = []
    if meta.get("teacher_served"):
        served = ", ".join(
            f"{'`' + s['model'] + '`' if s['model'] is not None else 'not reported'} "
            f"({s['rows']} row{'' if s['rows'] == 1 else 's'})" for s in meta["teacher_served"])
        parts.append(f"served as: {served}")
    if meta.get("teacher_batches"):
        parts.append("through the Batch API, batches "
                     + ", ".join(f"`{b}`" for b in meta["teacher_batches"]))
    return f" ({'; '.join(parts)})" if parts else ""


def dataset_card(cfg: PipelineConfig, funnel: dict[str, Any], n_rows: int,
                 provenance: dict[str, Any] | None = None) -> str:
    """sft/README.md. `provenance` (`teacher_provenance` of the kept rows): the models the
    teacher was served as, and the Batch API ids, beside the configured teacher."""
    meta = card_metadata(cfg, funnel, n_rows, provenance)
    steps = "\n".join(
        f"| {f['filter']} | {f['in']} | {f['out']} | "
        f"{', '.join(f'{k}: {v}' for k, v in f['dropped'].items()) or '-'} |"
        for f in meta["funnel"])
    kind = ("chain-of-thought rationales" if cfg.generate.task == "cot"
            else "instruction-response pairs")
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100)}---\n\n"
        f"# {cfg.name}: distilled training set\n\n"
        f"{n_rows} {kind} (`messages` column) generated by teacher `{meta['teacher']}`"
        f"{_provenance_prose(meta)} from "
        f"seeds `{meta['seed_source']}` and curated by "
        f"`distill` filters ({', '.join(meta['filters']) or 'none'}).\n\n"
        f"## Licences\n\n- seeds: {meta['seed_license']}\n"
        f"- teacher outputs: {meta['teacher_terms']}\n\n"
        f"## Files\n\n| file | format |\n|---|---|\n"
        f"| `sft.jsonl` | `messages` (chat), plus id, seed_id, question, gold, answer |\n"
        f"| `sft.parquet` | the same rows, parquet |\n"
        f"| `{FORMAT_FILES['prompt_completion']}` | prompt / completion strings |\n"
        f"| `{FORMAT_FILES['alpaca']}` | instruction / input / output (Alpaca) |\n\n"
        f"## Funnel\n\n{meta['counts']['generated']} generated, {meta['counts']['kept']} kept.\n\n"
        f"| filter | in | out | dropped |\n|---|---|---|---|\n{steps}\n\n"
        f"## Reproduce\n\n```\n{meta['command']}\n```\n\n"
        f"The run directory's `config.yaml` holds the fully resolved configuration.\n"
    )


def read_card_metadata(text: str) -> dict[str, Any]:
    """The YAML header of a card (tests and `distill push` read it back)."""
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    return yaml.safe_load(m.group(1)) if m else {}

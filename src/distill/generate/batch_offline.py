"""A CoT generation through an offline batch runner (vLLM `run-batch`), replayed from the cache.

    python -m distill.generate.batch_offline write pipeline.yaml batch.jsonl
    vllm run-batch -i batch.jsonl -o results.jsonl --model <teacher.model>
    python -m distill.generate.batch_offline load pipeline.yaml results.jsonl --run-dir runs/x
    distill run pipeline.yaml --run-dir runs/x       # every answer now comes from the cache

`write` produces the very lines `teacher.batch` would upload (OpenAI Batch API format: split into
batch.jsonl, batch.1.jsonl, ... over `batch_max_requests` / `batch_max_bytes`). `load` reads a
results file in the Batch API output format, applies the same response policies as the online
client (finish_reason, empty content, `generate.response_format`) and stores each answer under
the key the generate stage looks up; lines that failed are left out, so the run sends those
online. The pipeline's teacher must be `backend: openai` with `model` the name written here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from distill.config import ConfigError, PipelineConfig, load_config
from distill.generate.cot import build_jobs
from distill.records import RunDir
from distill.seeds import load_seeds
from distill.teachers.base import Completion, Job
from distill.teachers.batch_files import custom_id, parse_output_line, write_batch_jsonl
from distill.teachers.cache import ResponseCache, cache_key
from distill.teachers.responses import read_choice, served_model


def offline_jobs(cfg: PipelineConfig) -> list[Job]:
    if cfg.teacher.backend != "openai":
        raise ConfigError("teacher.backend: offline batches are replayed by the openai backend "
                          "(set backend: openai and model: the name the runner serves)")
    if cfg.generate.task != "cot" or cfg.generate.adaptive is not None or cfg.generate.source:
        raise ConfigError("generate: offline batch files cover plain cot generation only "
                          "(not instruct, adaptive or imported generations)")
    return build_jobs(cfg, load_seeds(cfg))


def write(cfg: PipelineConfig, path: Path) -> list[Path]:
    return write_batch_jsonl(cfg.teacher, offline_jobs(cfg), path)


def load(cfg: PipelineConfig, results: Path, cache: ResponseCache) -> dict[str, int]:
    """Put every usable answer of `results` into `cache`; counts of what was done."""
    t = cfg.teacher
    wanted = {custom_id("openai", t.model, job, s): (job, s)
              for job in offline_jobs(cfg) for s in job.samples}
    counts = dict.fromkeys(("cached", "failed", "unknown"), 0)
    with open(results, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            cid, _, body, why = parse_output_line(raw)
            if cid not in wanted:
                counts["unknown"] += 1
                continue
            comp = _completion(cfg, wanted[cid][0], body) if why is None else None
            if comp is None:
                counts["failed"] += 1
                continue
            job, s = wanted[cid]
            cache.put(cache_key("openai", t.model, job.messages, job.params, s,
                                job.response_format), comp)
            counts["cached"] += 1
    return counts


def _completion(cfg: PipelineConfig, job: Job, body: dict[str, Any]) -> Completion | None:
    choices = [c for c in body.get("choices") or [] if isinstance(c, dict)]
    if not choices:
        return None
    read = read_choice(cfg.teacher, job, choices[0])
    if read.policy == "retry":
        return None
    raw = body.get("usage")
    usage: dict[str, Any] = raw if isinstance(raw, dict) else {}
    comp = Completion(text=read.text, reasoning=read.reasoning, finish_reason=read.finish_reason,
                      prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0),
                      top_logprobs=read.top_logprobs)
    if read.policy == "drop":
        comp.fail("dropped", read.error)
    comp.extra = {"offline_batch": True}
    if served := served_model(body):
        comp.extra["served_model"] = served
    if read.parsed is not None:
        comp.extra["parsed"] = read.parsed
    return comp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill.generate.batch_offline",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the batch input JSONL")
    w.add_argument("pipeline", type=Path)
    w.add_argument("out", type=Path)
    ld = sub.add_parser("load", help="put a results JSONL into a run's response cache")
    ld.add_argument("pipeline", type=Path)
    ld.add_argument("results", type=Path)
    ld.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = load_config(args.pipeline)
    if args.cmd == "write":
        for p in write(cfg, args.out):
            print(p)
        return
    with ResponseCache(RunDir(args.run_dir).cache) as cache:
        print(load(cfg, args.results, cache))


if __name__ == "__main__":
    main()

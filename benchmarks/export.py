"""Edge-export benchmark: every format of a run's student, measured in its own runtime.

For each format (merged fp32, int8, onnx, int4, gguf) it prints bytes on disk, the ratio to the
fp32 student and to the teacher's fp32 weights, held-out accuracy (the evaluate stage's scorer),
CPU latency per answer (p50/p95), tokens/s, peak RSS and the logits' agreement with PyTorch —
all from one `distill.export.stage.export_all` call, so every number comes from the same run.

    python benchmarks/export.py runs/demo                      # a finished run dir
    python benchmarks/export.py runs/demo --pipeline pipelines/demo.yaml --eval-limit 100
    python benchmarks/export.py --synthetic /tmp/export-bench  # self-contained, no run needed

`--synthetic DIR` builds a run directory first (reused when DIR/run/student exists): a tiny
Llama student (hidden 128, 2 layers, byte-level BPE) that has memorized chain-of-thought answers
to 16 word problems — the held-out set is those problems, so accuracy measures how much of the
fp32 answer each format keeps — and a randomly initialised 4-layer teacher of hidden 512 whose
only role is its size.

Targets reported (not asserted): int8 keeps >= 99% of fp32 accuracy at >= 3x fewer bytes; the
smallest artifact is >= 50x smaller than the teacher's fp32 weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from distill.config import PipelineConfig, load_config  # noqa: E402
from distill.export.formats import FORMATS  # noqa: E402


def _mb(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def build_synthetic(root: Path, n_questions: int = 16, steps: int = 600) -> Path:
    """A run dir (config.yaml, student/, sft/) plus its project files under `root`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import make_tokenizer, overfit

    rng = torch.Generator().manual_seed(0)
    pairs = [(int(a), int(b)) for a, b in torch.randint(2, 60, (n_questions, 2), generator=rng)]
    seeds = [{"id": f"q{i}", "question": f"Tom has {a} apples and buys {b} more. How many "
              f"apples does he have now?", "answer": str(a + b)} for i, (a, b) in enumerate(pairs)]
    prompt = (ROOT / "prompts" / "cot.j2").read_text()
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    (root / "prompts" / "cot.j2").write_text(prompt)
    (root / "data" / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds))
    convs = [[{"role": "user", "content": f"{s['question']}\nLet's think step by step."},
              {"role": "assistant", "content": f"Tom starts with {a} apples. He buys {b} more, "
               f"so {a} + {b} = {a + b}.\nThe answer is {a + b}."}]
             for s, (a, b) in zip(seeds, pairs, strict=True)]
    run = root / "run"
    student = run / "student"
    teacher = root / "teacher"
    tok = make_tokenizer(student, [m["content"] for c in convs for m in c] * 4)
    tok.save_pretrained(teacher)

    def llama(hidden: int, layers: int) -> Any:
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True))

    torch.manual_seed(0)
    print("synthetic: training the student to memorize its answers ...", flush=True)
    model = overfit(llama(128, 2), tok, convs, steps=steps, lr=3e-3)
    model.save_pretrained(student, safe_serialization=True)
    tok.save_pretrained(student)
    llama(512, 4).save_pretrained(teacher, safe_serialization=True)
    (run / "sft").mkdir(parents=True, exist_ok=True)
    (run / "sft" / "sft.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n"
                                                   for c in convs))
    cfg = {"name": "export-bench", "seeds": {"path": "data/seeds.jsonl"},
           "teacher": {"backend": "transformers", "model": str(teacher)},
           "generate": {"prompt": "prompts/cot.j2", "max_tokens": 64},
           "evaluate": {"dataset": "data/seeds.jsonl", "max_tokens": 64, "bootstrap": 0},
           "export": {"formats": list(FORMATS)}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run


def load_run_config(run_dir: Path, pipeline: Path | None) -> PipelineConfig:
    if pipeline is not None:
        return load_config(pipeline)
    path = run_dir / "config.yaml"
    if not path.is_file():
        sys.exit(f"{run_dir}: no config.yaml; pass --pipeline PIPELINE.yaml")
    data = yaml.safe_load(path.read_text())
    # The resolved config drops `root`: relative paths resolve from the run's project.
    root = run_dir.parent if (run_dir.parent / data["generate"]["prompt"]).exists() else Path.cwd()
    return PipelineConfig.model_validate(data | {"root": str(root)})


def print_table(doc: dict[str, Any]) -> None:
    fp32_acc = doc.get("student_fp32_accuracy")
    print(f"\nstudent: {doc['student_params']:,} params, fp32 {_mb(doc['student_fp32_bytes'])}"
          f"; teacher fp32 {_mb(doc.get('teacher_bytes'))}"
          f" ({doc.get('teacher_params') or '?'} params); held-out items: {doc['n_eval']}; "
          f"threads: {doc['threads']}")
    head = (f"{'format':<7} {'bytes':>10} {'vs fp32':>8} {'vs teach':>9} {'acc':>6} "
            f"{'acc/fp32':>8} {'p50 s':>8} {'p95 s':>8} {'tok/s':>7} {'peak MB':>8} "
            f"{'max|Δ|':>8} {'top1':>5}  runtime")
    print(head)
    print("-" * len(head))
    for a in doc["artifacts"]:
        if not a["bytes"]:
            print(f"{a['format']:<7} skipped: {'; '.join(a['notes'])}")
            continue
        acc = "-" if a["accuracy"] is None else f"{a['accuracy'] * 100:.1f}%"
        print(f"{a['format']:<7} {_mb(a['bytes']):>10} {a['ratio_vs_fp32'] or '-':>7}x "
              f"{a['ratio_vs_teacher'] or '-':>8}x {acc:>6} {a['accuracy_vs_fp32'] or '-':>8} "
              f"{a['latency_p50_s']:>8.4f} {a['latency_p95_s']:>8.4f} {a['tokens_per_s']:>7} "
              f"{a['peak_mem_mb']:>8} {a['max_abs_diff']:>8.2g} {a['top1_agreement']:>5}  "
              f"{a['runtime']}")
    by = {a["format"]: a for a in doc["artifacts"] if a["bytes"]}
    print("\ntargets (reported, not asserted):")
    if "int8" in by and fp32_acc:
        keep = (by["int8"]["accuracy"] or 0) / fp32_acc
        print(f"  int8 keeps {keep * 100:.1f}% of fp32 accuracy (target >= 99%) at "
              f"{by['int8']['ratio_vs_fp32']}x fewer bytes (target >= 3x)")
    if doc.get("smallest") and doc["smallest"].get("ratio_vs_teacher"):
        s = doc["smallest"]
        print(f"  smallest artifact ({s['format']}, {_mb(s['bytes'])}) is "
              f"{s['ratio_vs_teacher']}x smaller than the teacher's fp32 weights (target >= 50x)")
    for a in doc["artifacts"]:
        for note in a["notes"]:
            print(f"  note {a['format']}: {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, nargs="?", help="run directory with student/")
    ap.add_argument("--synthetic", type=Path, help="build a self-contained run under this dir")
    ap.add_argument("--pipeline", type=Path, help="pipeline file (default: RUN_DIR/config.yaml)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--eval-limit", type=int, default=64)
    ap.add_argument("--latency-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--gguf-type", default="q8_0", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--int8-runtime", default="torch", choices=["torch", "onnxruntime"])
    ap.add_argument("--steps", type=int, default=600, help="--synthetic: memorization steps")
    ap.add_argument("--out", type=Path, help="export dir (default: RUN_DIR/export)")
    ap.add_argument("--json", type=Path, help="also write export.json here")
    args = ap.parse_args()
    if args.synthetic:
        run_dir = (args.synthetic / "run" if (args.synthetic / "run" / "student").is_dir()
                   else build_synthetic(args.synthetic, steps=args.steps))
    elif args.run_dir:
        run_dir = args.run_dir
    else:
        ap.error("give RUN_DIR or --synthetic DIR")
    cfg = load_run_config(run_dir, args.pipeline)
    export = {"formats": [f for f in args.formats.split(",") if f],
              "eval_limit": args.eval_limit, "latency_prompts": args.latency_prompts,
              "max_new_tokens": args.max_new_tokens, "threads": args.threads,
              "gguf_type": args.gguf_type, "int8_runtime": args.int8_runtime}
    if cfg.export is not None and cfg.export.prune is not None:
        export["prune"] = cfg.export.prune.model_dump()
    data = cfg.model_dump(mode="json") | {"export": export}
    cfg = PipelineConfig.model_validate(data)

    from distill.export.stage import export_all

    doc = export_all(cfg, run_dir / "student", args.out or run_dir / "export",
                     sft_dir=run_dir / "sft", run_dir=run_dir)
    print_table(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()

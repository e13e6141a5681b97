"""CPU training throughput of a real student: distill's train stage against plain TRL, one run.

    python scripts/real_model.py                       # SmolLM2-135M-Instruct, converted once
    python benchmarks/train_throughput.py              # every variant, 6 steps of 8 rows each
    python benchmarks/train_throughput.py --steps 10 --variants trl,sft

The rows: the shipped demo teacher's verified rationales for the demo's procedural word problems
(`distill generate` + `filter` on `--steps` x `--batch` seeds, with its top-8 soft targets), in a
scratch project under .cache/bench-train. The student: SmolLM2-135M-Instruct, LoRA r16 on every
linear layer, batch 8, max_length 256, lr 2e-4, the same rows and number of steps for every
variant, each in a fresh process (peak RSS is that process's).

Variants (`--variants`, comma-separated):
- trl: plain TRL `SFTTrainer` + PEFT `LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
  target_modules="all-linear")`, TRL's defaults otherwise. TRL defaults to bf16; where this CPU
  has no native bf16 (the matmul check below) that would emulate every matmul, so the row runs
  with bf16 off and says so.
- today: distill's train stage with the settings it had before the fast path (full LM head,
  activation checkpointing, LoRA dropout 0.05, random batches).
- then one lever at a time on top: +no_ckpt, +compact_head, +dropout0, and `sft` = the current
  defaults (+ length-bucketed batches; bf16 where native; checkpointing auto, which is on at
  8 x 256 tokens), `sft@no_ckpt` the same with checkpointing off.
- xtok_today / xtok: cross-tokenizer KD on the demo teacher's stored top-8 soft targets (its own
  tokenizer → SmolLM2's), before and after (`xtok@no_ckpt`: checkpointing off).
- kd_today / kd: same-vocabulary KD with a local teacher (SmolLM2-135M-Instruct itself, frozen,
  full logits each step) — slow, not in the default set.

Printed per variant: seconds per step (the first step excluded: warm-up), trained (loss-bearing)
tokens/s, tokens/s of all real tokens, the loss at each step and its mean over the last half,
peak RSS, and the nominal model FLOP/s (4 x parameters x tokens/s, the LoRA estimate) as a
fraction of the fp32 and bf16 matmul peaks measured at the start of the same run. Then the
ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".cache" / "bench-train"
STUDENT = ROOT / ".cache" / "real-models" / "smollm2-135m-instruct"

OLD = ["train.compact_head=false", "train.gradient_checkpointing=true",
       "train.lora.dropout=0.05", "train.group_by_length=false", "train.bf16=false"]
"""The train stage's settings before the fast path."""
VARIANTS: dict[str, list[str]] = {
    "today": OLD,
    "+no_ckpt": OLD[:1] + ["train.gradient_checkpointing=false"] + OLD[2:],
    "+compact_head": ["train.gradient_checkpointing=false"] + OLD[2:],
    "+dropout0": ["train.gradient_checkpointing=false", "train.group_by_length=false",
                  "train.bf16=false"],
    "sft": [],
    "sft@no_ckpt": ["train.gradient_checkpointing=false"],
    "xtok_today": [*OLD, "train.method=kd"],
    "xtok": ["train.method=kd"],
    "xtok@no_ckpt": ["train.method=kd", "train.gradient_checkpointing=false"],
    "kd_today": [*OLD, "train.method=kd", "train.kd.soft_targets=teacher",
                 f"train.kd.teacher_model={STUDENT}"],
    "kd": ["train.method=kd", "train.kd.soft_targets=teacher",
           f"train.kd.teacher_model={STUDENT}"],
}
DEFAULT = ("trl,today,+no_ckpt,+compact_head,+dropout0,sft,sft@no_ckpt,xtok_today,xtok,"
           "xtok@no_ckpt")

PIPELINE = """\
name: bench-train
stages: [generate, filter, train]
seed: 0
seeds:
  task: {{name: arithmetic, split: train, n: {n}, seed: 0}}
teacher:
  backend: transformers
  model: {root}/data/models/demo-teacher
  dtype: float32
  device: cpu
  batch_size: 125
  top_logprobs: 8
generate:
  prompt: cot
  temperature: 0.7
  max_tokens: 96
filter:
  verify: {{}}
  dedup: {{exact: true}}
train:
  student: {student}
  method: sft
  lora: {{r: 16, alpha: 32}}
  max_steps: {steps}
  batch_size: {batch}
  learning_rate: 2.0e-4
  max_length: 256
  logging_steps: 1
  kd: {{temperature: 2.0, alpha: 0.5, soft_targets: stored}}
"""


# --- measurements -------------------------------------------------------------------------------


def matmul_peak(dtype_name: str, seconds: float = 1.0) -> float:
    """GFLOP/s of a [1024, 576] x [576, 1536] matmul (SmolLM2's MLP shape) in this process."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from distill.train.precision import matmul_gflops

    return matmul_gflops(getattr(torch, dtype_name), seconds=seconds, shape=(1024, 576, 1536))


def row_tokens(cfg: Any, rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Mean (all, loss-bearing) student tokens per row: the chat-template prompt + the reply."""
    from distill.train.student import load_tokenizer

    tok = load_tokenizer(cfg)
    total = loss = 0
    for r in rows:
        msgs = r["messages"]
        prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(msgs, tokenize=False)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        n_full = len(tok(full, add_special_tokens=False)["input_ids"])
        total, loss = total + n_full, loss + n_full - n_prompt
    return total / len(rows), loss / len(rows)


# --- one variant, in its own process ------------------------------------------------------------


def run_trl(cfg: Any, rows: list[dict[str, Any]], steps: int, batch: int, bf16: bool
            ) -> dict[str, Any]:
    """Plain TRL SFTTrainer + PEFT LoRA with their defaults, on the same prompt/completion rows."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
                              for r in rows])
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                         learning_rate=2e-4, max_length=256, logging_steps=1, report_to="none",
                         save_strategy="no", disable_tqdm=True, bf16=bf16, seed=0)
        trainer = SFTTrainer(model=str(STUDENT), args=args, train_dataset=data,
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                    target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        params = sum(p.numel() for p in trainer.model.parameters())
        steps_t = StepTimes()
        trainer.add_callback(steps_t.callback())
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {"train_s": train_s, "step_s": steps_t.times, "loss_history": losses,
            "params": params, "bf16": bf16}


class StepTimes:
    """Wall seconds of each optimizer step (a TrainerCallback)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                outer._t = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                outer.times.append(time.perf_counter() - outer._t)

        return _CB()


def child(name: str, project: Path, steps: int, batch: int, bf16_native: bool) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from distill.config import load_config
    from distill.io import read_stage_rows
    from distill.records import RunDir
    from distill.train.stage import TRAINERS

    overrides = [] if name == "trl" else VARIANTS[name]
    cfg = load_config(project / "pipeline.yaml", overrides)
    run_dir = RunDir(project / "runs" / cfg.name)
    rows = read_stage_rows(run_dir.stage("sft"), "sft.jsonl")
    all_tok, loss_tok = row_tokens(cfg, rows)
    if name == "trl":
        info = run_trl(cfg, rows, steps, batch, bf16=bf16_native)
    else:
        st = StepTimes()
        with tempfile.TemporaryDirectory() as out:
            info = TRAINERS[cfg.train.method](cfg, run_dir, rows, Path(out) / "student",
                                               label=name, callbacks=[st.callback()])
        info["step_s"] = st.times
        from distill.train.memory import use_activation_checkpointing
        from distill.train.precision import use_bf16

        info["bf16"] = use_bf16(cfg)
        info["ckpt"] = cfg.train.gradient_checkpointing
        info["ckpt_resolved"] = use_activation_checkpointing(cfg, _Sized(cfg))
    info["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info["tokens_per_row"], info["loss_tokens_per_row"] = all_tok, loss_tok
    print("RESULT " + json.dumps({k: info.get(k) for k in (
        "train_s", "step_s", "loss_history", "params", "bf16", "ckpt_resolved", "rss_mb",
        "tokens_per_row", "loss_tokens_per_row")}), flush=True)


class _Sized:
    """The student's config, for `use_activation_checkpointing` (it reads `.config`)."""

    def __init__(self, cfg: Any) -> None:
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(cfg.resolve(cfg.train.student))


# --- the parent: prepare once, run each variant, print the table ---------------------------------


def prepare(steps: int, batch: int) -> Path:
    """The scratch project with generate + filter done (cached by the pipeline itself)."""
    sys.path.insert(0, str(ROOT / "src"))
    from distill.api import Pipeline

    WORK.mkdir(parents=True, exist_ok=True)
    n = int(steps * batch * 1.25) + 16  # verify + exact dedup drop a few
    (WORK / "pipeline.yaml").write_text(PIPELINE.format(
        n=n, root=ROOT, student=STUDENT, steps=steps, batch=batch))
    Pipeline.from_yaml(WORK / "pipeline.yaml", run_dir=WORK / "runs" / "bench-train").run(
        ["generate", "filter"])
    return WORK


def summarize(name: str, r: dict[str, Any], batch: int, peaks: dict[str, float]
              ) -> dict[str, Any]:
    warm = r["step_s"][1:] or r["step_s"]
    step = sum(warm) / len(warm)
    tok_s = batch * r["tokens_per_row"] / step
    loss_s = batch * r["loss_tokens_per_row"] / step
    flops = 4 * r["params"] * tok_s / 1e9
    losses = [round(v, 4) for _, v in r["loss_history"]]
    tail = losses[len(losses) // 2:]
    return {"variant": name, "s_per_step": round(step, 2), "loss_tok_s": round(loss_s, 1),
            "all_tok_s": round(tok_s, 1), "rss_gb": round(r["rss_mb"] / 1024, 2),
            "model_gflops": round(flops, 1),
            "of_fp32_peak": round(flops / peaks["float32"], 3),
            "of_bf16_peak": round(flops / peaks["bfloat16"], 3),
            "bf16": r["bf16"], "ckpt": r.get("ckpt_resolved"),
            "loss_tail_mean": round(sum(tail) / max(len(tail), 1), 4), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--bf16-native", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    if a.child:
        child(a.child, WORK, a.steps, a.batch, a.bf16_native)
        return
    if not (STUDENT / "config.json").is_file():
        sys.exit(f"{STUDENT}: missing; run python scripts/real_model.py first")
    import torch

    threads = torch.get_num_threads()
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    native = peaks["bfloat16"] > 1.3 * peaks["float32"]
    print(f"matmul peak ({threads} threads, [1024,576]x[576,1536]): fp32 "
          f"{peaks['float32']:.1f} GFLOP/s, bf16 {peaks['bfloat16']:.1f} GFLOP/s"
          f" -> bf16 {'native' if native else 'NOT native (emulated)'}", flush=True)
    project = prepare(a.steps, a.batch)
    results = []
    for name in a.variants.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(a.steps),
               "--batch", str(a.batch)] + (["--bf16-native"] if native else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=project,
                              env=os.environ | {"DISTILL_PROGRESS_EVERY": "3600"}, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed (rc {proc.returncode}): {proc.stderr[-800:]}", flush=True)
            continue
        row = summarize(name, json.loads(line[7:]), a.batch, peaks)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    print_table(results, native)
    if a.json:
        a.json.write_text(json.dumps({"peaks": peaks, "threads": threads,
                                      "results": results}, indent=1))


def print_table(results: list[dict[str, Any]], native: bool) -> None:
    print("\n| variant | s/step | loss tok/s | all tok/s | x today | x trl | of fp32 peak "
          "| of bf16 peak | peak RSS GB | ckpt | bf16 | loss (last half) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    by = {r["variant"]: r for r in results}
    for r in results:
        base = by.get("xtok_today" if r["variant"].startswith("xtok") else
                      "kd_today" if r["variant"].startswith("kd") else "today")
        x_today = r["all_tok_s"] / base["all_tok_s"] if base else float("nan")
        x_trl = r["all_tok_s"] / by["trl"]["all_tok_s"] if "trl" in by else float("nan")
        print(f"| {r['variant']} | {r['s_per_step']} | {r['loss_tok_s']} | {r['all_tok_s']} | "
              f"{x_today:.2f} | {x_trl:.2f} | {r['of_fp32_peak']:.0%} | {r['of_bf16_peak']:.0%}"
              f" | {r['rss_gb']} | {r['ckpt']} | {r['bf16']} | {r['loss_tail_mean']} |")
    if not native:
        print("\nbf16 is not native on this CPU: TRL's default bf16=True would emulate every "
              "matmul, so the trl row ran with bf16 off; the bf16-peak fractions are against "
              "the emulated peak.")


if __name__ == "__main__":
    main()

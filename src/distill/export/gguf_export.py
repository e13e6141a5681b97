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

Fallback — the hand-written writer below, kept for two cases the converter cannot serve: it
cannot be fetched (offline, no cache), or it does not recognise the tokenizer (llama.cpp names
a BPE pre-tokenizer by hashing how it splits a fixed text, so a new or custom tokenizer — like
the tests' tiny ones — is refused). It handles `llama` and `qwen2` (default RoPE, SiLU MLP);
export.json notes say which writer made the file. Anything else is skipped with the reason.

The hand-written writer, following llama.cpp's converter:

- tensor names: `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
  ffn_gate, ffn_up, ffn_down}`, `output_norm`, `output` (absent when tied to the embedding);
- llama's Q/K rows are permuted from Hugging Face's half-split RoPE layout to GGML's interleaved
  pairs (qwen2 runs NEOX RoPE in llama.cpp and keeps the HF layout);
- 2-D weights as `gguf_type` (Q8_0: blocks of 32 int8 values with one f16 scale; a row whose
  length is not a multiple of 32 falls back to F16), 1-D norms and biases as F32;
- tokenizer: `gpt2` (byte-level BPE) tokens, token types (special → CONTROL, other added →
  USER_DEFINED), merges, bos/eos/pad/unk ids, the llama.cpp pre-tokenizer name (read from
  tokenizer.json, or `gguf_pre`), and the chat template.

Runtime: llama-cpp-python when it is installed; otherwise `GGUFNumpyModel`, a numpy forward pass
over the dequantized GGUF tensors with GGML's conventions (interleaved RoPE on the permuted
weights) for `llama` and `qwen2` files, which proves the file — not just the source model —
computes the student. Other architectures are exported but not measured without llama.cpp.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ConfigError
from distill.export.merge import copy_side_files
from distill.export.runtime import (
    MODEL_FILES,
    Runner,
    load_tokenizer_dir,
    read_model_config,
    stop_ids,
)

SUPPORTED = ("llama", "qwen2")

# tokenizer.json pre-tokenizer → llama.cpp `tokenizer.ggml.pre` (regexes as in llama-vocab.cpp).
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
                "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
               "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def check_supported(config: dict[str, Any]) -> None:
    arch = config.get("model_type")
    if arch not in SUPPORTED:
        raise ConfigError(f"export.formats: gguf: model_type {arch!r} not supported "
                          f"(supported: {', '.join(SUPPORTED)})")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"export.formats: gguf: hidden_act {config['hidden_act']!r} "
                          "not supported (silu)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"export.formats: gguf: RoPE scaling {rope.get('rope_type')!r} "
                          "not supported (default RoPE only)")


def rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def detect_pre(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if LLAMA3_REGEX in regexes:
        return "llama-bpe"
    if QWEN2_REGEX in regexes:
        return "qwen2"
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    if kinds and kinds[-1] == "ByteLevel" and steps[-1].get("use_regex", True):
        return "smollm" if digits else "gpt-2"
    return "default"


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split RoPE rows → GGML interleaved pairs (llama.cpp's LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(state: dict[str, np.ndarray], config: dict[str, Any]
                 ) -> dict[str, np.ndarray]:
    """HF tensor names and layouts → GGUF names and layouts (float32, before quantization)."""
    arch = config["model_type"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    tied = config.get("tie_word_embeddings", False)
    per_layer = {"input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    for proj, short in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                        ("o_proj", "attn_output")):
        per_layer[f"self_attn.{proj}.weight"] = f"{short}.weight"
        per_layer[f"self_attn.{proj}.bias"] = f"{short}.bias"
    out: dict[str, np.ndarray] = {}
    for name, arr in state.items():
        arr = np.asarray(arr, dtype=np.float32)
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = arr
        elif name == "model.norm.weight":
            out["output_norm.weight"] = arr
        elif name == "lm_head.weight":
            if not tied:
                out["output.weight"] = arr
        elif name.startswith("model.layers."):
            idx, _, rest = name.removeprefix("model.layers.").partition(".")
            if rest not in per_layer:
                raise ConfigError(f"export.formats: gguf: no GGUF name for tensor {name}")
            if arch == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = n_head if "q_proj" in rest else n_kv
                arr = permute_rope(arr, heads)
            out[f"blk.{idx}.{per_layer[rest]}"] = arr
        elif "rotary_emb" not in name:
            raise ConfigError(f"export.formats: gguf: no GGUF name for tensor {name}")
    return out


def _token_table(tok: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # the embedding is padded past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types]


def _merges(tokenizer_json: dict[str, Any]) -> list[str]:
    merges = tokenizer_json.get("model", {}).get("merges", [])
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def load_state(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state |= load_file(str(f))
    return state


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
        target = out_dir / MODEL_FILES["gguf"]
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


def write_gguf_builtin(model_dir: Path, out_dir: Path, *, qtype: str = "q8_0",
                       pre: str = "auto", name: str = "distill-student") -> dict[str, Any]:
    """The hand-written writer (llama, qwen2): `out_dir/model.gguf`, notes and a round trip."""
    import gguf

    config = read_model_config(model_dir)
    check_supported(config)
    tok = load_tokenizer_dir(model_dir)
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise ConfigError(f"{model_dir}: gguf needs a fast tokenizer (tokenizer.json)")
    tj = json.loads(tj_path.read_text())
    if tj.get("model", {}).get("type") != "BPE":
        raise ConfigError(f"{tj_path}: gguf export supports byte-level BPE tokenizers only")
    pre_name = detect_pre(tj) if pre == "auto" else pre
    notes = [f"llama.cpp pre-tokenizer: {pre_name}"]
    if pre_name == "default":
        notes.append("pre-tokenizer not recognised: llama.cpp may split text differently")

    tensors = gguf_tensors(load_state(model_dir), config)
    arch = config["model_type"]
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    vocab_size = config["vocab_size"]
    qt = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}[qtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MODEL_FILES["gguf"]
    w = gguf.GGUFWriter(str(target), arch)
    w.add_name(name)
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(vocab_size)
    w.add_file_type(int(ftype))
    tokens, types = _token_table(tok, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_name)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(tj))
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id), ("unk_token_id", w.add_unk_token_id)):
        value = getattr(tok, key, None)
        if value is not None:
            add(int(value))
    probe = tok("a")["input_ids"]
    w.add_add_bos_token(bool(probe) and probe[0] == tok.bos_token_id)
    if getattr(tok, "chat_template", None):
        w.add_chat_template(str(tok.chat_template))

    fallback = []
    for tname, arr in tensors.items():
        this = qt
        if arr.ndim == 1:
            this = gguf.GGMLQuantizationType.F32
        elif qt == gguf.GGMLQuantizationType.Q8_0 and arr.shape[-1] % 32:
            this = gguf.GGMLQuantizationType.F16
            fallback.append(tname)
        data = gguf.quants.quantize(arr, this)
        if this in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(tname, data)
        else:
            w.add_tensor(tname, data, raw_dtype=this)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    copy_side_files(model_dir, out_dir)
    if fallback:
        notes.append(f"{len(fallback)} tensors with rows not a multiple of 32 kept as f16")
    check = check_roundtrip(target, tensors)
    notes.append(f"GGUFReader round trip: {check['tensors']} tensors, max |Δ| "
                 f"{check['max_abs_diff']:.2e} ({qtype})")
    return {"notes": notes, "roundtrip": check, "writer": "builtin"}


def read_gguf(path: Path, tensors: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, float32 tensors in numpy layout — empty when `tensors` is False) of a GGUF
    file; a bad file is a ConfigError."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - wrong magic, truncated file
        raise ConfigError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})"
                          ) from None
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens",
                                              "tokenizer.ggml.merges",
                                              "tokenizer.ggml.token_type"):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001, S112 - an exotic field we do not need
            continue
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors if tensors else []:
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = np.asarray(arr, dtype=np.float32).reshape(shape)
    return meta, out


def check_roundtrip(path: Path, expected: dict[str, np.ndarray]) -> dict[str, Any]:
    _, got = read_gguf(path)
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ValueError(f"{path}: tensors missing after writing: {missing[:5]}")
    diff = max(float(np.abs(got[k] - v).max()) for k, v in expected.items())
    return {"tensors": len(got), "max_abs_diff": diff}


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


class GGUFNumpyModel:
    """Reference forward pass from the GGUF tensors alone (no torch), with a KV cache."""

    def __init__(self, path: Path) -> None:
        meta, _ = read_gguf(path, tensors=False)
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED:
            raise ConfigError(f"{path}: the numpy GGUF reference runs {', '.join(SUPPORTED)}, "
                              f"not {arch!r} (install llama-cpp-python to run it)")
        meta, self.t = read_gguf(path)
        self.arch = str(arch)
        self.n_layers = int(meta[f"{arch}.block_count"])
        self.n_head = int(meta[f"{arch}.attention.head_count"])
        self.n_kv = int(meta[f"{arch}.attention.head_count_kv"])
        self.head_dim = int(meta.get(f"{arch}.attention.key_length")
                            or meta[f"{arch}.embedding_length"] // self.n_head)
        self.eps = float(meta[f"{arch}.attention.layer_norm_rms_epsilon"])
        base = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
        d = self.head_dim
        self.inv_freq = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
        self.output = self.t.get("output.weight", self.t["token_embd.weight"])
        self.meta = meta
        self.reset()

    def reset(self) -> None:
        self.k: list[np.ndarray] = [np.zeros((self.n_kv, 0, self.head_dim), np.float32)
                                    for _ in range(self.n_layers)]
        self.v: list[np.ndarray] = [np.zeros_like(k) for k in self.k]
        self.length = 0

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x [heads, n, d]; GGML 'normal' mode rotates (2i, 2i+1), NEOX mode (i, i + d/2)."""
        ang = pos[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        if self.arch == "llama":
            x0, x1 = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = x0 * cos - x1 * sin
            out[..., 1::2] = x0 * sin + x1 * cos
            return out
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half], x[..., half:]
        return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)

    def forward(self, ids: list[int]) -> np.ndarray:
        t, n = self.t, len(ids)
        pos = np.arange(self.length, self.length + n, dtype=np.float64)
        x = t["token_embd.weight"][np.asarray(ids)]
        group = self.n_head // self.n_kv
        total = self.length + n
        # Causal mask over [cached + new] keys for the n new queries.
        mask = np.where(np.arange(total)[None, :] <= (self.length + np.arange(n))[:, None],
                        0.0, -np.inf).astype(np.float32)
        for i in range(self.n_layers):
            p = f"blk.{i}."
            h = _rms_norm(x, t[p + "attn_norm.weight"], self.eps)
            qkv = []
            for name, heads in (("attn_q", self.n_head), ("attn_k", self.n_kv),
                                ("attn_v", self.n_kv)):
                y = h @ t[p + name + ".weight"].T
                if p + name + ".bias" in t:
                    y = y + t[p + name + ".bias"]
                qkv.append(y.reshape(n, heads, self.head_dim).transpose(1, 0, 2))
            q, k, v = qkv
            q, k = self._rope(q, pos), self._rope(k, pos)
            self.k[i] = np.concatenate([self.k[i], k], axis=1)
            self.v[i] = np.concatenate([self.v[i], v], axis=1)
            keys = np.repeat(self.k[i], group, axis=0)
            vals = np.repeat(self.v[i], group, axis=0)
            scores = q @ keys.transpose(0, 2, 1) / math.sqrt(self.head_dim) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = (scores / scores.sum(-1, keepdims=True)) @ vals
            o = att.transpose(1, 0, 2).reshape(n, -1) @ t[p + "attn_output.weight"].T
            if p + "attn_output.bias" in t:
                o = o + t[p + "attn_output.bias"]
            x = x + o
            h = _rms_norm(x, t[p + "ffn_norm.weight"], self.eps)
            g = h @ t[p + "ffn_gate.weight"].T
            up = h @ t[p + "ffn_up.weight"].T
            x = x + ((g / (1.0 + np.exp(-g))) * up) @ t[p + "ffn_down.weight"].T
        self.length = total
        x = _rms_norm(x, t["output_norm.weight"], self.eps)
        return np.asarray(x @ self.output.T, dtype=np.float32)


class GGUFNumpyRunner(Runner):
    fmt = "gguf"
    backend = "numpy"

    def __init__(self, path: Path) -> None:
        self.model = GGUFNumpyModel(path / MODEL_FILES["gguf"])
        tok = load_tokenizer_dir(path)
        super().__init__(tok, stop_ids(tok, path))

    def reset(self) -> None:
        self.model.reset()

    def forward(self, ids: list[int]) -> np.ndarray:
        return self.model.forward(ids)


# Words, digits of several place values, punctuation and a newline: what a tokenizer must split
# the same way for llama.cpp's own tokenization to be trusted.
TOKENIZER_PROBE = ("Tom has 12 apples and buys 345 more, then 6,078 pears: 12 + 345 = 357.\n"
                   "The answer is 357.")


class LlamaCppRunner(Runner):
    """llama.cpp through llama-cpp-python; tokenization by llama.cpp from the GGUF vocabulary."""

    fmt = "gguf"
    backend = "llama.cpp"

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int = 2048,
                 logits_all: bool = False) -> None:
        from llama_cpp import Llama

        model_file = path / MODEL_FILES["gguf"]
        read_gguf_header(model_file)
        self.path = path
        tok = load_tokenizer_dir(path)  # the chat template renders as in transformers
        super().__init__(tok, stop_ids(tok, path))
        cfg = read_model_config(path) if (path / "config.json").is_file() else {}
        n_ctx = min(n_ctx, int(cfg.get("max_position_embeddings", n_ctx)))
        try:
            # n_threads_batch too: left unset it is every core, and prefill threads that
            # spin-wait on a busy machine cost more than a model this small computes.
            self.llm = Llama(model_path=str(model_file), n_ctx=n_ctx, n_batch=min(512, n_ctx),
                             n_threads=threads, n_threads_batch=threads,
                             logits_all=logits_all, verbose=False)
        except Exception as err:  # noqa: BLE001 - llama.cpp refused the file
            raise ConfigError(f"{model_file}: llama.cpp cannot load it ({err})") from None
        self.logits_all = logits_all
        self.tokenizer_note = self._check_tokenizer()
        self.own_tokenizer = self.tokenizer_note is None

    def _check_tokenizer(self) -> str | None:
        """None when llama.cpp tokenizes and detokenizes a probe chat exactly as tokenizer.json
        does; else why not — then token ids come from the transformers tokenizer and llama.cpp
        runs the weights only (llama.cpp applies no tokenizer.json normalizer, e.g. the demo
        tokenizer's place-value digit marks)."""
        from distill.chat_template import render_chat

        text = render_chat(self.tokenizer, [{"role": "user", "content": TOKENIZER_PROBE}])
        text += TOKENIZER_PROBE
        want = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        got = list(self.llm.tokenize(text.encode(), add_bos=False, special=True))
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False))
                          if a != b),
                         min(len(got), len(want)))
            why = "; tokenizer.json has a normalizer llama.cpp does not apply" \
                if self._has_normalizer() else ""
            return (f"llama.cpp's own tokenizer splits text differently from tokenizer.json "
                    f"(probe: {len(got)} vs {len(want)} tokens, first difference at token "
                    f"{first}{why}): prompts are tokenized and answers decoded by the "
                    "transformers tokenizer, llama.cpp runs the weights on those token ids")
        ref = str(self.tokenizer.decode(want, skip_special_tokens=True)).strip()
        dec = self.llm.detokenize([t for t in want if t not in self._special_ids()])
        if dec.decode("utf-8", errors="replace").strip() != ref:
            return ("llama.cpp detokenizes differently from tokenizer.json: answers decoded by "
                    "the transformers tokenizer, llama.cpp runs the weights")
        return None

    def _has_normalizer(self) -> bool:
        path = self.path / "tokenizer.json"
        return path.is_file() and bool(json.loads(path.read_text()).get("normalizer"))

    def _special_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", []) or [])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.own_tokenizer:
            return super().encode_chat(messages)
        from distill.chat_template import render_chat

        text = render_chat(self.tokenizer, messages)
        return list(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def decode(self, ids: list[int]) -> str:
        if not self.own_tokenizer:
            return super().decode(ids)
        return self.llm.detokenize(ids).decode("utf-8", errors="replace").strip()

    def reset(self) -> None:
        self.llm.reset()

    def forward(self, ids: list[int]) -> np.ndarray:
        start = self.llm.n_tokens
        self.llm.eval(ids)
        if self.logits_all:
            return np.array(self.llm.scores[start:self.llm.n_tokens], dtype=np.float32)
        # Without logits_all, Llama.eval keeps no scores: read the last token's logits from the
        # context (keeping every position would cost n_ctx × vocab floats).
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float32)[None]

    def close(self) -> None:
        self.llm.close()


def read_gguf_header(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"{path}: GGUF file not found")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ConfigError(f"{path}: not a GGUF file (bad magic)")


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def load_gguf_runner(path: Path, threads: int | None = None, backend: str = "auto") -> Runner:
    """llama.cpp when installed (backend auto|llama.cpp), else the numpy reference."""
    read_gguf_header(path / MODEL_FILES["gguf"])
    if backend == "llama.cpp" or (backend == "auto" and llama_cpp_available()):
        return LlamaCppRunner(path, threads=threads)
    return GGUFNumpyRunner(path)

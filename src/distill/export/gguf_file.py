"""GGUF tensors and metadata: the hand-written writer (llama, qwen2) and the reader.

The hand-written writer is the fallback of `gguf_export.write_gguf` for two cases llama.cpp's
converter cannot serve: it cannot be fetched (offline, no cache), or it does not recognise the
tokenizer (llama.cpp names a BPE pre-tokenizer by hashing how it splits a fixed text, so a new or
custom tokenizer — like the tests' tiny ones — is refused). It handles `llama` and `qwen2`
(default RoPE, SiLU MLP), following llama.cpp's converter:

- tensor names: `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
  ffn_gate, ffn_up, ffn_down}`, `output_norm`, `output` (absent when tied to the embedding);
- llama's Q/K rows are permuted from Hugging Face's half-split RoPE layout to GGML's interleaved
  pairs (qwen2 runs NEOX RoPE in llama.cpp and keeps the HF layout);
- 2-D weights as `gguf_type` (Q8_0: blocks of 32 int8 values with one f16 scale; a row whose
  length is not a multiple of 32 falls back to F16), 1-D norms and biases as F32;
- tokenizer: `gpt2` (byte-level BPE) tokens, token types (special → CONTROL, other added →
  USER_DEFINED), merges, bos/eos/pad/unk ids, the llama.cpp pre-tokenizer name (read from
  tokenizer.json, or `gguf_pre`), and the chat template.

`read_gguf` reads any GGUF file back (metadata, dequantized tensors): the writer's round-trip
check, the converter's notes and the numpy reference forward (`gguf_runtime.py`) use it;
`tensor_type_counts` says which types llama.cpp's quantizer chose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ConfigError
from distill.export.files import GGUF_FILE
from distill.export.merge import copy_side_files
from distill.export.runtime import load_tokenizer_dir, read_model_config

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
    """float32 numpy tensors of a model directory. Read through torch: numpy knows bfloat16
    only once `ml_dtypes` is imported (by onnx), so a bf16 model (the demo teacher) loaded or
    failed depending on what ran before it in the process."""
    from safetensors.torch import load_file

    state: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state |= {k: v.float().numpy() for k, v in load_file(str(f)).items()}
    return state


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
    target = out_dir / GGUF_FILE
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


def tensor_type_counts(path: Path, row: int) -> tuple[dict[str, int], int]:
    """(GGML type name → tensors of that type in the file, how many of its 2-D tensors have
    rows whose length is not a multiple of `row`)."""
    import gguf

    counts: dict[str, int] = {}
    off_rows = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        shape = t.shape.tolist()  # GGML order: the row length first
        off_rows += len(shape) >= 2 and int(shape[0]) % row != 0
    return counts, off_rows


def check_roundtrip(path: Path, expected: dict[str, np.ndarray]) -> dict[str, Any]:
    _, got = read_gguf(path)
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ValueError(f"{path}: tensors missing after writing: {missing[:5]}")
    diff = max(float(np.abs(got[k] - v).max()) for k, v in expected.items())
    return {"tensors": len(got), "max_abs_diff": diff}

"""Export on a real pretrained LM (SmolLM2-135M): issue #15.

Each test here failed before the fix it guards: torch dynamic int8 agreed with fp32 on 0.47 of
teacher-forced positions while export.json said nothing; the ONNX graph stored the tied embedding
twice (653 MB vs 538 MB); GGUF came only from a hand-written llama/qwen2 writer and one
unsupported format aborted the whole export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distill.config import load_config
from distill.export.files import weight_bytes
from distill.export.merge import TorchRunner, load_torch_model
from distill.export.runtime import load_tokenizer_dir, stop_ids
from tests.test_export import _project

pytestmark = pytest.mark.real
PROMPTS = ("Janet's ducks lay 16 eggs per day. She eats three and bakes muffins with four. "
           "She sells the rest for $2 each. How much does she make every day?",
           "Explain in two sentences why the sky is blue.")


def _converter() -> Path:
    from distill.config import ConfigError
    from distill.export.gguf_export import fetch_converter

    try:
        return fetch_converter()
    except ConfigError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def real_export(tmp_path_factory: pytest.TempPathFactory, real_model: Path) -> dict[str, Any]:
    """merged, int8, onnx and gguf of SmolLM2-135M-Instruct, exported and measured once."""
    from distill.export.stage import export_all

    _converter()
    root = tmp_path_factory.mktemp("real-export")
    path = _project(root, real_model, ["merged", "int8", "onnx", "gguf"])
    text = path.read_text().replace("eval_limit: 3", "eval_limit: 2").replace(
        "latency_prompts: 2", "latency_prompts: 1\n  max_new_tokens: 16\n  fidelity_prompts: 4")
    path.write_text(text)
    cfg = load_config(path)
    out = root / "run" / "export"
    doc = export_all(cfg, real_model, out, run_dir=root / "run")
    return {"doc": doc, "out": out, "by": {a["format"]: a for a in doc["artifacts"]}}


def _forced(runner: Any, seq: list[int], ref: np.ndarray, n_prompt: int) -> tuple[float, float]:
    """Top-1 agreement and max |Δlogit| on the positions that predict the answer (one prefill;
    the stage's own measure feeds the answer through the KV cache instead)."""
    runner.reset()
    got, want = runner.forward(seq)[n_prompt - 1:], ref[n_prompt - 1:]
    return float((got.argmax(-1) == want.argmax(-1)).mean()), float(np.abs(got - want).max())


def _sequences(model_dir: Path, tokens: int = 24
               ) -> tuple[Any, list[list[int]], list[Any], list[int]]:
    """The fp32 runner; each prompt + its greedy answer; fp32 logits; prompt lengths."""
    from distill.chat_template import render_chat

    tok = load_tokenizer_dir(model_dir)
    ref = TorchRunner(load_torch_model(model_dir), tok, stop_ids(tok, model_dir))
    seqs, n_prompt = [], []
    for p in PROMPTS:
        ids = list(tok(render_chat(tok, [{"role": "user", "content": p}]),
                       add_special_tokens=False)["input_ids"])
        seqs.append(ids + ref.generate(ids, tokens)[0])
        n_prompt.append(len(ids))
    refs = []
    for s in seqs:
        ref.reset()
        refs.append(ref.forward(s))
    return ref, seqs, refs, n_prompt


def test_default_int8_keeps_top1_agreement_at_a_quarter_of_the_bytes(
        real_model: Path, tmp_path: Path) -> None:
    """The default int8 (group-wise weight-only) agrees with fp32 on ≥ 97% of teacher-forced
    answer positions here (0.985 over 6 prompts in `int8_bench`) at ≤ 0.3× the fp32 bytes; the
    old default (dynamic int8 Linear: 0.48 in the bench) does not."""
    from distill.export.quantize import export_int8, load_int8_runner

    ref, seqs, refs, n_prompt = _sequences(real_model)
    export_int8(ref.model, real_model, tmp_path / "int8")
    assert weight_bytes(tmp_path / "int8") <= 0.3 * weight_bytes(real_model)
    for compute, check in (("weight-only", lambda t: t >= 0.97), ("dynamic", lambda t: t < 0.9)):
        runner = load_int8_runner(tmp_path / "int8", compute=compute)
        hits = [_forced(runner, s, r, n) for s, r, n in zip(seqs, refs, n_prompt, strict=True)]
        top1 = float(np.mean([h[0] for h in hits]))
        assert check(top1), (compute, hits)


def _min_top1(row: dict[str, Any]) -> float:
    """0.9 on these 64 positions for weight-only 8 bits (int8; the GGUF's Q8_0 tensors through
    the numpy reference: 0.9375). llama.cpp itself also rounds activations to 8 bits in its Q8_0
    dot products and keeps the KV cache in f16: 0.8906 measured on the same positions (7
    misses of 64, the numpy reference 4), so it gets 0.85."""
    return 0.85 if row["runtime"].startswith("llama.cpp") else 0.9


def test_export_json_reports_fidelity_for_every_artifact(real_export: dict[str, Any]) -> None:
    """Every artifact has teacher-forced top-1 agreement and max |Δlogit| on ≥ 4 held-out
    prompts; lossless formats agree exactly, 8-bit ones within a stated tolerance (≥ 0.9 on
    these few positions: Q8_0-like int8 measured 0.94–0.99 on SmolLM2 depending on prompts),
    and whatever falls under the floor is listed in `flagged`."""
    doc, by = real_export["doc"], real_export["by"]
    assert doc["min_top1_agreement"] == 0.98 and doc["skipped"] == []
    for fmt, a in by.items():
        assert a["fidelity_prompts"] >= 4 and a["fidelity_positions"] >= 4 * 8, (fmt, a)
        assert a["below_floor"] == (a["top1_agreement"] < 0.98), fmt
        assert (fmt in doc["flagged"]) == a["below_floor"]
        assert a["accuracy"] is not None and a["bytes"] > 0
    assert by["merged"]["top1_agreement"] == 1.0 and by["merged"]["max_abs_dlogit"] < 1e-3
    assert by["onnx"]["top1_agreement"] == 1.0 and by["onnx"]["max_abs_dlogit"] < 1e-2
    for fmt in ("int8", "gguf"):
        assert by[fmt]["top1_agreement"] >= _min_top1(by[fmt]), by[fmt]
        assert by[fmt]["max_abs_dlogit"] < 5, by[fmt]
    on_disk = json.loads((real_export["out"] / "export.json").read_text())
    assert on_disk["artifacts"][1]["top1_agreement"] == by["int8"]["top1_agreement"]


def test_an_artifact_under_the_floor_is_flagged(real_export: dict[str, Any],
                                                real_model: Path, tmp_path: Path) -> None:
    """The fidelity measure sees what accuracy on a few items hides: the old dynamic int8,
    measured like every artifact, falls under the floor and is flagged."""
    from distill.export.measure import ForcedSequence, fidelity
    from distill.export.quantize import load_int8_runner
    from distill.export.stage import flag_row

    _, seqs, refs, n_prompt = _sequences(real_model, tokens=16)
    forced = [ForcedSequence(s, n, r) for s, n, r in zip(seqs, n_prompt, refs, strict=True)]
    row: dict[str, Any] = {"notes": []}
    row |= fidelity(load_int8_runner(real_export["out"] / "int8", compute="dynamic"), forced)
    flag_row(row, 0.98)
    assert row["below_floor"] is True and "FLAGGED" in row["notes"][-1], row


def test_onnx_stores_the_tied_embedding_once(real_export: dict[str, Any]) -> None:
    by = real_export["by"]
    assert by["onnx"]["bytes"] <= by["merged"]["bytes"] * 1.02, by["onnx"]["bytes"]
    assert any("stored once" in n for n in by["onnx"]["notes"])


def test_gguf_of_the_real_model_comes_from_llama_cpp_converter(real_export: dict[str, Any],
                                                               real_model: Path) -> None:
    from safetensors.numpy import load_file

    from distill.export.gguf_file import read_gguf

    gguf = real_export["by"]["gguf"]
    assert "convert_hf_to_gguf" in gguf["notes"][0], gguf["notes"]
    assert gguf["top1_agreement"] >= _min_top1(gguf), gguf
    meta, tensors = read_gguf(real_export["out"] / "gguf" / "model.gguf")
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    hf = load_file(str(real_model / "model.safetensors"))["model.embed_tokens.weight"]
    err = np.abs(tensors["token_embd.weight"] - hf).max()
    assert err <= np.abs(hf).max() / 127 and "output.weight" not in tensors  # Q8_0, tied


def _tiny(kind: str, out: Path, tokenizer_dir: Path) -> Path:
    """A tiny random model of another architecture with the real (llama.cpp-known) tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = load_tokenizer_dir(tokenizer_dir)
    common = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if kind == "qwen3":
        cfg = AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256, tie_word_embeddings=True,
                                   **common)
    else:  # OPT: a causal LM llama.cpp's converter does not know
        cfg = AutoConfig.for_model("opt", hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=64,
                                   max_position_embeddings=256, **common)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    return out


def test_qwen3_exports_gguf_through_the_converter(real_model: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from distill.export.gguf_export import write_gguf
    from distill.export.gguf_file import read_gguf

    _converter()
    src = _tiny("qwen3", tmp_path / "qwen3", real_model)
    info = write_gguf(src, tmp_path / "gguf", qtype="f32")
    assert info["writer"] == "llama.cpp", info
    meta, tensors = read_gguf(tmp_path / "gguf" / "model.gguf")
    assert meta["general.architecture"] == "qwen3"
    hf = load_file(str(src / "model.safetensors"))
    np.testing.assert_array_equal(tensors["token_embd.weight"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(tensors["blk.1.attn_k_norm.weight"],
                                  hf["model.layers.1.self_attn.k_norm.weight"])
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"],
                                  hf["model.layers.0.mlp.down_proj.weight"])


def test_unsupported_architecture_skips_gguf_and_exports_the_rest(
        real_model: Path, tmp_path: Path) -> None:
    from distill.export.stage import export_all

    _converter()
    src = _tiny("opt", tmp_path / "opt", real_model)
    cfg = load_config(_project(tmp_path, src, ["merged", "onnx", "gguf"]))
    doc = export_all(cfg, src, tmp_path / "run" / "export", run_dir=tmp_path / "run")
    by = {a["format"]: a for a in doc["artifacts"]}
    assert doc["skipped"] == ["gguf"] and by["gguf"]["bytes"] is None
    assert "skipped" in by["gguf"]["notes"][-1] and "not supported" in by["gguf"]["notes"][-1]
    for fmt in ("merged", "onnx"):
        assert by[fmt]["bytes"] > 0 and by[fmt]["top1_agreement"] == 1.0, by[fmt]

"""`int8` and `int4`: smaller weights for CPU.

int8 — a documented packing in safetensors (no pickle, loads with `safetensors` alone):
every `nn.Linear` and `nn.Embedding` weight W [rows, cols] is stored as
`<name>` int8 = round(W / s) clipped to ±127 and `<name>.int8_scale` float32 [rows] with
s = max|W_row| / 127 (symmetric, per output channel / per token row). Everything else (norms,
biases) stays float32. The header's metadata says `format: distill-int8` and lists the packed
tensors. At load, Linear layers become PyTorch dynamic int8 Linear modules (int8 weights,
activations quantized per batch on the fly — `torch.ao.nn.quantized.dynamic.Linear`); embeddings
gather int8 rows and scale them. A tied LM head reuses the embedding's int8 rows, stored once.

With `export.int8_runtime: onnxruntime` the int8 artifact is instead the ONNX graph with 8-bit
block weights (ORT MatMulNBits, weight-only, block 32; the embedding stays float32) — more
accurate than per-tensor dynamic activations on small models, larger where the embedding is big.

int4 — ONNX Runtime's `MatMulNBitsQuantizer` turns the fp32 ONNX graph's MatMul weights (and
the embedding Gather) into 4-bit symmetric blocks (`int4_block_size` values share one scale),
run by ORT's MatMulNBits / GatherBlockQuantized kernels. It needs `onnx-ir` (ORT's optional
dependency); without it the artifact is skipped with a note, never faked.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config import ConfigError
from distill.export.merge import TorchRunner, copy_side_files
from distill.export.runtime import (
    MODEL_FILES,
    load_tokenizer_dir,
    read_model_config,
    stop_ids,
)

INT8_FORMAT = "distill-int8"
SCALE_SUFFIX = ".int8_scale"


def quantize_rows_int8(w: Any) -> tuple[Any, Any]:
    """Symmetric per-row int8: (int8 tensor, float32 scale per row)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def export_int8(model: Any, src_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Pack `model`'s Linear/Embedding weights to int8 into `out_dir/model.int8.safetensors`."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    packed: list[str] = []
    done: dict[int, str] = {}  # data_ptr → name, so a tied weight is stored once
    quantizable = {f"{n}.weight" for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear | torch.nn.Embedding)}
    for name, t in model.state_dict(keep_vars=False).items():
        if name in quantizable and t.dim() == 2:
            if t.data_ptr() in done:
                continue  # tied to a weight already packed; recorded in the metadata
            q, s = quantize_rows_int8(t)
            tensors[name], tensors[name + SCALE_SUFFIX] = q, s
            packed.append(name)
            done[t.data_ptr()] = name
        else:
            tensors[name] = t.detach().float().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    tied = {n: done[t.data_ptr()] for n, t in model.state_dict().items()
            if n in quantizable and t.dim() == 2 and done.get(t.data_ptr()) not in (None, n)}
    meta = {"format": INT8_FORMAT, "scheme": "symmetric per-row absmax int8",
            "packed": json.dumps(packed), "tied": json.dumps(tied)}
    save_file(tensors, str(out_dir / MODEL_FILES["int8"]), metadata=meta)
    copy_side_files(src_dir, out_dir)
    return {"notes": [f"{len(packed)} weight matrices packed to int8 (per-row scales)"]}


class Int8Embedding(torch.nn.Module):
    """Gather int8 rows and scale them: the embedding never exists in float32."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.num_embeddings, self.embedding_dim = q.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].float() * self.scale[ids].unsqueeze(-1)


def dynamic_int8_linear(q: Any, scale: Any, bias: Any) -> Any:
    """A `torch.ao` dynamic int8 Linear from stored int8 rows and per-row scales."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-tensor constructors warn of deprecation
        from torch.ao.nn.quantized.dynamic import Linear

        out_f, in_f = q.shape
        qw = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(out_f, dtype=torch.long), 0)
        lin = Linear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
        lin.set_weight_bias(qw, None if bias is None else bias.float())
    return lin


def _set_module(root: Any, dotted: str, module: Any) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def load_int8_model(path: Path) -> Any:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = path / MODEL_FILES["int8"]
    if not weights.is_file():
        raise ConfigError(f"{weights}: int8 weights not found")
    read_model_config(path)
    try:
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open API
    except Exception as err:  # noqa: BLE001 - truncated or corrupt file
        raise ConfigError(f"{weights}: not a readable safetensors file ({err})") from None
    if meta.get("format") != INT8_FORMAT:
        raise ConfigError(f"{weights}: not a {INT8_FORMAT} file (metadata format="
                          f"{meta.get('format')!r})")
    packed: list[str] = json.loads(meta["packed"])
    tied: dict[str, str] = json.loads(meta.get("tied", "{}"))
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(path))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    modules = dict(model.named_modules())
    for name in [*packed, *tied]:
        src = tied.get(name, name)
        q, s = tensors[src], tensors[src + SCALE_SUFFIX]
        mod_name = name.removesuffix(".weight")
        mod = modules[mod_name]
        if isinstance(mod, torch.nn.Embedding):
            _set_module(model, mod_name, Int8Embedding(q, s))
        else:
            bias = tensors.get(f"{mod_name}.bias")
            _set_module(model, mod_name, dynamic_int8_linear(q, s, bias))
    consumed = {f"{n.removesuffix('.weight')}.bias" for n in [*packed, *tied]}
    rest = {k: v for k, v in tensors.items()
            if k not in packed and not k.endswith(SCALE_SUFFIX) and k not in consumed}
    # Norms and other float tensors go straight into their parameters (the quantized modules'
    # own state-dict hooks expect a different layout).
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    unexpected, loaded = [], set()
    for key, value in rest.items():
        target = params.get(key, buffers.get(key))
        if target is None or tuple(target.shape) != tuple(value.shape):
            unexpected.append(key)
            continue
        with torch.no_grad():
            target.copy_(value)
        loaded.add(key)
    missing = [n for n in params if n not in loaded]
    if missing or unexpected:
        raise ConfigError(f"{weights}: tensors do not match the config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return model.eval()


def load_int8_runner(path: Path, threads: int | None = None) -> TorchRunner:
    model = load_int8_model(path)
    tok = load_tokenizer_dir(path)
    return TorchRunner(model, tok, stop_ids(tok, path), "int8", threads)


def int4_available() -> str | None:
    """None when ORT's n-bit quantizer can run here, else the reason it cannot."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401
    except ImportError as err:
        return f"onnxruntime MatMulNBits quantizer unavailable ({err}); pip install onnx-ir"
    return None


def export_int4(onnx_dir: Path, out_dir: Path, block_size: int = 32) -> dict[str, Any]:
    """4-bit block quantization of an fp32 ONNX export (MatMul weights and the embedding)."""
    return export_nbits(onnx_dir, out_dir, 4, block_size)


def export_nbits(onnx_dir: Path, out_dir: Path, bits: int, block_size: int = 32
                 ) -> dict[str, Any]:
    """Weight-only block quantization of an fp32 ONNX export with ORT's MatMulNBits quantizer.

    bits=4 also packs the embedding Gather (GatherBlockQuantized); ORT packs Gather only at 4
    bits, so at 8 bits the embedding stays float32.
    """
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    model = onnx.load(str(onnx_dir / MODEL_FILES["onnx"]))
    ops = ("MatMul", "Gather") if bits == 4 else ("MatMul",)
    algo = mq.DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=4, bits=bits,
        op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer = mq.MatMulNBitsQuantizer(model, algo_config=algo)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node it visits at INFO
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero rows (the pad embedding)
            quantizer.process()
    finally:
        logger.setLevel(level)
    out_dir.mkdir(parents=True, exist_ok=True)
    big = quantizer.model.model.ByteSize() > 1_800_000_000
    quantizer.model.save_model_to_file(str(out_dir / MODEL_FILES["onnx"]),
                                       use_external_data_format=big)
    copy_side_files(onnx_dir, out_dir)
    ops = {n.op_type for n in quantizer.model.model.graph.node}
    n4 = sum(n.op_type in ("MatMulNBits", "GatherBlockQuantized")
             for n in quantizer.model.model.graph.node)
    return {"notes": [f"{n4} ops at {bits} bits (block {block_size}, symmetric): "
                      f"{', '.join(sorted(ops & {'MatMulNBits', 'GatherBlockQuantized'}))}"]}

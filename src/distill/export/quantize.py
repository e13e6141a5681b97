"""`int8` and `int4`: smaller weights for CPU.

int8 — a documented packing in safetensors (no pickle, loads with `safetensors` alone):
every `nn.Linear` and `nn.Embedding` weight W [rows, cols] is stored as
`<name>` int8 = round(W / s) clipped to ±127 and `<name>.int8_scale` float32 [rows] with
s = max|W_row| / 127 (symmetric, per output channel / per token row). Everything else (norms,
biases) stays float32. The header's metadata says `format: distill-int8` and lists the packed
tensors. A tied LM head reuses the embedding's int8 rows (one row scale per vocabulary entry
serves both the gather and the head's output channel), stored once.

Values: symmetric int8 with one fp16 scale per 32 consecutive values of a row (the numbers of
llama.cpp's Q8_0), 1.06 bytes per weight: 143 MB for SmolLM2-135M (538 MB fp32).

Runtime (`compute`): weight-only. At load every packed matrix is dequantized (q × s) into a
float32 parameter and activations stay float32, so the only error is the weight rounding; a tied
head stays tied. Teacher-forced top-1 agreement with fp32 on SmolLM2-135M (6 prompts + 48-token
fp32 answers, every position; instruct / base copy): group-32 fp16 scales 0.986 / 0.985; one
scale per row 0.970 / 0.971; PyTorch dynamic int8 Linear (the former default, activations
quantized per tensor on the fly, `compute="dynamic"`) 0.484 / 0.553 with max |Δlogit| 38 / 32 —
per-tensor activation scales cannot hold a real LM's outlier channels, and keeping the head in
float does not help (0.51 / 0.52). In memory the weights are float32 again (speed and RAM of the
fp32 model): PyTorch's int8-weight kernel (`_weight_int8pack_mm`) would keep int8 in RAM but ran
~10× slower than the fp32 matmul per decode step on the 2-core AMD CPU used here.

With `export.int8_runtime: onnxruntime` the int8 artifact is instead the ONNX graph with 8-bit
block weights (ORT MatMulNBits, weight-only, block 32; the embedding Gather stays float32, so the
file holds the tied embedding twice: fp32 for the gather and 8-bit for the head).

int4, torch layout (`export.int4_runtime: torch`) — `model.int4.safetensors`: every Linear and
Embedding weight as two 4-bit values per byte (levels −8..7, Q4_0-style: the largest magnitude
maps to −8) with one fp16 scale per `int4_block_size` values of a row (the largest divisor of a
row length it does not divide, at least 8: 24 for the demo student's 48-wide rows), the scale
clip searched per group (d × {1, 0.95, …, 0.75}, least squared error). Dequantized to float32 at
load like int8. No graph is stored, which is what a tiny model needs: the demo student's ONNX
graph alone is ~70 KB, so ORT's int4 of it (171 KB) is bigger than int8 (106 KB); this is ~65 KB.

int4, ONNX Runtime (default) — ORT's `MatMulNBitsQuantizer` turns the fp32 ONNX graph's MatMul
weights (and the embedding Gather) into 4-bit symmetric blocks (`int4_block_size` values share
one scale), run by ORT's MatMulNBits / GatherBlockQuantized kernels. It needs `onnx-ir` (ORT's
optional dependency); without it the artifact is skipped with a note, never faked.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config import ConfigError
from distill.export.files import INT4_TORCH_FILE, INT8_FILE, ONNX_FILE
from distill.export.merge import TorchRunner, copy_side_files
from distill.export.runtime import load_tokenizer_dir, read_model_config, stop_ids

INT8_FORMAT = "distill-int8"
SCALE_SUFFIX = ".int8_scale"


GROUP_SIZE = 32


def quantize_rows_int8(w: Any) -> tuple[Any, Any]:
    """Symmetric per-row int8: (int8 tensor, float32 scale per row)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_groups_int8(w: Any, group: int = GROUP_SIZE) -> tuple[Any, Any]:
    """Symmetric int8 with one fp16 scale per `group` consecutive values of a row.

    (int8 [rows, cols], float16 [rows, cols / group]); a row whose length is not a multiple of
    `group` gets one scale per row. The scale is rounded to fp16 before the values are, so
    q × s reproduces what was rounded. The same numbers as llama.cpp's Q8_0.
    """
    w = w.detach().float()
    rows, cols = w.shape
    g = group if cols % group == 0 else cols
    x = w.reshape(rows, cols // g, g)
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-7).half()
    q = torch.round(x / scale.float()).clamp(-127, 127).to(torch.int8)
    return q.reshape(rows, cols).contiguous(), scale.squeeze(-1).contiguous()


def dequantize_int8(q: Any, scale: Any) -> Any:
    """float32 weights from int8 values and per-row [rows] or per-group [rows, groups] scales."""
    rows, cols = q.shape
    s = scale.float().reshape(rows, -1)
    return (q.float().reshape(rows, s.shape[1], -1) * s[..., None]).reshape(rows, cols)


def export_int8(model: Any, src_dir: Path, out_dir: Path, group: int = GROUP_SIZE
                ) -> dict[str, Any]:
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
            q, s = quantize_groups_int8(t, group)
            tensors[name], tensors[name + SCALE_SUFFIX] = q, s
            packed.append(name)
            done[t.data_ptr()] = name
        else:
            tensors[name] = t.detach().float().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    tied = {n: done[t.data_ptr()] for n, t in model.state_dict().items()
            if n in quantizable and t.dim() == 2 and done.get(t.data_ptr()) not in (None, n)}
    meta = {"format": INT8_FORMAT, "group_size": str(group),
            "scheme": f"symmetric absmax int8, one fp16 scale per {group} values of a row "
                      "(per row when the row length is not a multiple)",
            "packed": json.dumps(packed), "tied": json.dumps(tied)}
    save_file(tensors, str(out_dir / INT8_FILE), metadata=meta)
    copy_side_files(src_dir, out_dir)
    notes = [f"{len(packed)} weight matrices packed to int8 (symmetric, fp16 scale per "
             f"{group} values), dequantized to fp32 at load (weight-only)"]
    if tied:
        pairs = ", ".join(f"{a} = {b}" for a, b in tied.items())
        notes.append(f"tied weights stored once: {pairs}")
    return {"notes": notes}


class Int8Embedding(torch.nn.Module):
    """Gather int8 rows and scale them: the embedding never exists in float32."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.num_embeddings, self.embedding_dim = q.shape

    weight_int8: torch.Tensor
    scale: torch.Tensor

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


COMPUTE_MODES = ("weight-only", "dynamic", "dynamic-keep-head")


def _read_quantized_file(weights: Path, fmt: str = INT8_FORMAT, what: str = "int8"
                         ) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, tensors) of a quantized safetensors artifact whose metadata says `fmt`; a
    missing, corrupt or foreign file is a ConfigError naming it."""
    from safetensors import safe_open

    if not weights.is_file():
        raise ConfigError(f"{weights}: {what} weights not found")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open API
    except Exception as err:  # noqa: BLE001 - truncated or corrupt file
        raise ConfigError(f"{weights}: not a readable safetensors file ({err})") from None
    if meta.get("format") != fmt:
        raise ConfigError(f"{weights}: not a {fmt} file (metadata format="
                          f"{meta.get('format')!r})")
    return meta, tensors


def _dequantized(tensors: dict[str, Any], names: list[str], tied: dict[str, str]
                 ) -> dict[str, Any]:
    """float32 W = q × s for every packed (or tied) weight."""
    out = {}
    for name in [*names, *tied]:
        src = tied.get(name, name)
        out[name] = dequantize_int8(tensors[src], tensors[src + SCALE_SUFFIX])
    return out


def _swap_dynamic(model: Any, tensors: dict[str, Any], packed: list[str],
                  tied: dict[str, str], keep: set[str]) -> set[str]:
    """Replace packed Linear/Embedding modules by int8 ones (except `keep`); their keys."""
    modules = dict(model.named_modules())
    swapped = set()
    for name in [*packed, *tied]:
        mod_name = name.removesuffix(".weight")
        if mod_name in keep:
            continue
        src = tied.get(name, name)
        # PyTorch's int8 modules take one scale per row: requantize the group-wise weights.
        q, s = quantize_rows_int8(dequantize_int8(tensors[src], tensors[src + SCALE_SUFFIX]))
        if isinstance(modules[mod_name], torch.nn.Embedding):
            _set_module(model, mod_name, Int8Embedding(q, s))
        else:
            _set_module(model, mod_name,
                        dynamic_int8_linear(q, s, tensors.get(f"{mod_name}.bias")))
            swapped.add(f"{mod_name}.bias")
        swapped.add(name)
    return swapped


def load_int8_model(path: Path, compute: str = "weight-only") -> Any:
    """The int8 artifact as a transformers model.

    compute: `weight-only` (default) dequantizes the int8 rows into float32 weights (float32
    activations); `dynamic` runs every Linear as PyTorch dynamic int8 (activations quantized per
    tensor) and gathers int8 embedding rows; `dynamic-keep-head` is `dynamic` except the LM head
    and embedding, which are dequantized. The last two are kept to measure against.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute: {compute!r} not one of {COMPUTE_MODES}")
    weights = path / INT8_FILE
    read_model_config(path)
    meta, tensors = _read_quantized_file(weights)
    packed: list[str] = json.loads(meta["packed"])
    tied: dict[str, str] = json.loads(meta.get("tied", "{}"))
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    swapped: set[str] = set()
    if compute != "weight-only":
        keep = set() if compute == "dynamic" else {
            n.removesuffix(".weight") for n in [*packed, *tied]
            if isinstance(model.get_submodule(n.removesuffix(".weight")),
                          torch.nn.Embedding) or n == "lm_head.weight"}
        swapped = _swap_dynamic(model, tensors, packed, tied, keep)
    floats = {k: v for k, v in tensors.items() if k not in packed and not k.endswith(SCALE_SUFFIX)}
    floats |= _dequantized(tensors, packed, tied)
    _load_floats(model, weights, {k: v for k, v in floats.items() if k not in swapped})
    return model.eval()


def _load_floats(model: Any, weights: Path, floats: dict[str, Any]) -> None:
    """Copy float tensors into the model's parameters/buffers by name; all must match.

    By name rather than `load_state_dict`: the quantized modules' own state-dict hooks expect a
    different layout. A tied head is the embedding's parameter, so it is not listed twice.
    """
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied head: both names
    buffers = dict(model.named_buffers())
    unexpected, loaded = [], set()
    for key, value in floats.items():
        target = params.get(key, buffers.get(key))
        if target is None or tuple(target.shape) != tuple(value.shape):
            unexpected.append(key)
            continue
        with torch.no_grad():
            target.copy_(value)
        loaded.add(key)
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing or unexpected:
        raise ConfigError(f"{weights}: tensors do not match the config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")


def load_int8_runner(path: Path, threads: int | None = None,
                     compute: str = "weight-only") -> TorchRunner:
    model = load_int8_model(path, compute)
    tok = load_tokenizer_dir(path)
    return TorchRunner(model, tok, stop_ids(tok, path), "int8", threads)


INT4_FORMAT = "distill-int4"
INT4_SCALE_SUFFIX = ".int4_scale"
INT4_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def int4_group(cols: int, group: int) -> int:
    """Values per fp16 scale in a row of `cols`: `group` when it divides the row, else the
    largest divisor of `cols` below it that is at least 8 (48-wide rows and group 32 → 24), else
    the whole row."""
    if cols % group == 0:
        return group
    return next((g for g in range(min(group, cols), 7, -1) if cols % g == 0), cols)


def quantize_groups_int4(w: Any, group: int = GROUP_SIZE) -> tuple[Any, Any]:
    """Symmetric 4-bit with one fp16 scale per group, clip searched: (uint8 [rows, ⌈cols/2⌉]
    two values per byte, low nibble first; float16 [rows, cols / g]).

    Levels −8..7 as in llama.cpp's Q4_0 (the value of largest magnitude m maps to −8: d = m/−8);
    per group the scale is then the one of d × {1, 0.95, …, 0.75} with the least squared error
    (clipping the largest value a little buys resolution for the rest).
    """
    w = w.detach().float()
    rows, cols = w.shape
    g = int4_group(cols, group)
    x = w.reshape(rows, cols // g, g)
    idx = x.abs().argmax(dim=-1, keepdim=True)
    d0 = torch.gather(x, -1, idx) / -8.0
    d0 = torch.where(d0.abs() < 1e-8, torch.full_like(d0, 1e-8), d0)
    best_q, best_d, best_err = None, None, None
    for f in INT4_CLIP_GRID:
        d = (d0 * f).half().float()
        d = torch.where(d == 0, torch.full_like(d, 1e-7), d)  # an fp16 underflow
        q = torch.round(x / d).clamp(-8, 7)
        err = ((q * d - x) ** 2).sum(-1, keepdim=True)
        if best_q is None or best_d is None or best_err is None:
            best_q, best_d, best_err = q, d, err
        else:
            better = err < best_err
            best_q = torch.where(better, q, best_q)
            best_d = torch.where(better, d, best_d)
            best_err = torch.minimum(err, best_err)
    assert best_q is not None and best_d is not None
    nib = (best_q.reshape(rows, cols) + 8).to(torch.uint8)
    if cols % 2:
        nib = torch.cat([nib, torch.zeros(rows, 1, dtype=torch.uint8)], dim=1)
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return packed.contiguous(), best_d.squeeze(-1).half().contiguous()


def dequantize_int4(packed: Any, scale: Any, cols: int) -> Any:
    """float32 [rows, cols] from two 4-bit values per byte and per-group fp16 scales."""
    rows = packed.shape[0]
    nib = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(rows, -1)[:, :cols]
    q = nib.float() - 8.0
    s = scale.float().reshape(rows, -1)
    return (q.reshape(rows, s.shape[1], -1) * s[..., None]).reshape(rows, cols)


def export_int4_torch(model: Any, src_dir: Path, out_dir: Path, group: int = GROUP_SIZE,
                      keep_int8: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Pack `model`'s Linear/Embedding weights to 4 bits into `out_dir/model.int4.safetensors`
    (norms stay float32; a tied head is stored once), dequantized to float32 at load. Weights
    whose name contains one of `keep_int8` are stored as int8 (fp16 scale per 32) instead:
    mixed precision, as llama.cpp's Q4_K_M keeps its most sensitive tensors at more bits."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    shapes: dict[str, list[int]] = {}
    eight: list[str] = []
    done: dict[int, str] = {}
    quantizable = {f"{n}.weight" for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear | torch.nn.Embedding)}
    state = model.state_dict()
    for name, t in state.items():
        if name in quantizable and t.dim() == 2:
            if t.data_ptr() in done:
                continue
            if any(k in name for k in keep_int8):
                q, s = quantize_groups_int8(t, GROUP_SIZE)
                tensors[name], tensors[name + SCALE_SUFFIX] = q, s
                eight.append(name)
            else:
                q, s = quantize_groups_int4(t, group)
                tensors[name], tensors[name + INT4_SCALE_SUFFIX] = q, s
            shapes[name] = list(t.shape)
            done[t.data_ptr()] = name
        else:
            tensors[name] = t.detach().float().contiguous()
    tied = {n: done[t.data_ptr()] for n, t in state.items()
            if n in quantizable and t.dim() == 2 and done.get(t.data_ptr()) not in (None, n)}
    groups = sorted({int4_group(c, group) for n, (_, c) in shapes.items() if n not in eight})
    meta = {"format": INT4_FORMAT, "group_size": str(group),
            "scheme": f"symmetric 4-bit (levels -8..7, Q4_0-style), one fp16 scale per {group} "
                      "values of a row (or the largest divisor of the row length below it), "
                      f"scale clip searched over {list(INT4_CLIP_GRID)}",
            "shapes": json.dumps(shapes), "tied": json.dumps(tied), "int8": json.dumps(eight)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / INT4_TORCH_FILE), metadata=meta)
    copy_side_files(src_dir, out_dir)
    n4 = sum(math.prod(v) for k, v in shapes.items() if k not in eight)
    n_all = sum(math.prod(v) for v in shapes.values())
    notes = [f"{len(shapes) - len(eight)} weight matrices packed to 4 bits (symmetric, fp16 "
             f"scale per {'/'.join(map(str, groups))} values, clip searched), dequantized to "
             "fp32 at load (weight-only; torch layout, no ONNX graph)"]
    if eight:
        notes.append(f"mixed precision: {len(eight)} matrices kept int8 (names containing "
                     f"{', '.join(keep_int8)}; fp16 scale per {GROUP_SIZE}): "
                     f"{n4 / n_all:.0%} of the weights are 4-bit")
    if tied:
        notes.append("tied weights stored once: "
                     + ", ".join(f"{a} = {b}" for a, b in tied.items()))
    return {"notes": notes}


def load_int4_model(path: Path) -> Any:
    """The torch-layout int4 artifact as a float32 transformers model (weights q × s)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    weights = path / INT4_TORCH_FILE
    read_model_config(path)
    meta, tensors = _read_quantized_file(weights, INT4_FORMAT, "int4")
    shapes: dict[str, list[int]] = json.loads(meta["shapes"])
    tied: dict[str, str] = json.loads(meta.get("tied", "{}"))
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    floats = {k: v for k, v in tensors.items() if k not in shapes
              and not k.endswith((INT4_SCALE_SUFFIX, SCALE_SUFFIX))}
    eight = set(json.loads(meta.get("int8", "[]")))
    for name in [*shapes, *tied]:
        src = tied.get(name, name)
        floats[name] = dequantize_int8(tensors[src], tensors[src + SCALE_SUFFIX]) \
            if src in eight else dequantize_int4(tensors[src], tensors[src + INT4_SCALE_SUFFIX],
                                                 shapes[src][1])
    _load_floats(model, weights, floats)
    return model.eval()


def load_int4_runner(path: Path, threads: int | None = None) -> TorchRunner:
    model = load_int4_model(path)
    tok = load_tokenizer_dir(path)
    return TorchRunner(model, tok, stop_ids(tok, path), "int4", threads)


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

    from distill.export.onnx_export import untie_transposes

    model = onnx.load(str(onnx_dir / ONNX_FILE))
    untie_transposes(model)  # the tied head as a MatMul weight again, so it is quantized too
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
    quantizer.model.save_model_to_file(str(out_dir / ONNX_FILE),
                                       use_external_data_format=big)
    copy_side_files(onnx_dir, out_dir)
    kinds = {n.op_type for n in quantizer.model.model.graph.node}
    n4 = sum(n.op_type in ("MatMulNBits", "GatherBlockQuantized")
             for n in quantizer.model.model.graph.node)
    return {"notes": [f"{n4} ops at {bits} bits (block {block_size}, symmetric): "
                      f"{', '.join(sorted(kinds & {'MatMulNBits', 'GatherBlockQuantized'}))}"]}

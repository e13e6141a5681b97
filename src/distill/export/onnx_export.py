"""`onnx`: an fp32 ONNX graph with an explicit KV cache, run by ONNX Runtime on CPU.

optimum's exporter is not used: its ONNX package (optimum-onnx 0.1) pins transformers < 4.58.
Instead `torch.onnx.export` (the TorchScript exporter) traces a thin wrapper around the
transformers model whose inputs and outputs are plain tensors:

    inputs   input_ids [b, s], attention_mask [b, past + s], position_ids [b, s],
             past_key_values.{i}.key / .value [b, kv_heads, past, head_dim]   (past may be 0)
    outputs  logits [b, s, vocab], present.{i}.key / .value [b, kv_heads, past + s, head_dim]

the same names optimum uses, so ORT GenAI-style loops work on it.

A tied LM head is stored once: the tracer writes the head's weight as its own constant-folded
initializer (the transposed embedding), which on SmolLM2-135M made the graph 653 MB against 538 MB
of safetensors. `share_tied_weights` replaces such an initializer by a Transpose of the embedding
(ORT folds it back when the session is created, so the logits are bit-identical); the quantizers
undo it first (`untie_transposes`) so the head is still quantized as a MatMul weight.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ConfigError
from distill.export.files import ONNX_FILE
from distill.export.merge import copy_side_files
from distill.export.runtime import Runner, load_tokenizer_dir, read_model_config, stop_ids


def _kv_shape(config: Any) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _wrapper(model: Any) -> Any:
    import inspect

    import torch
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"

    class KVWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                    *past: Any) -> tuple[Any, ...]:
            cache = DynamicCache(config=self.model.config)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=True, **{cache_arg: cache})
            new = getattr(out, "cache", None) or out.past_key_values
            flat: list[Any] = []
            for layer in new.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return KVWrapper().eval()


def export_onnx(model: Any, src_dir: Path, out_dir: Path, opset: int = 21) -> dict[str, Any]:
    """Trace `model` to `out_dir/model.onnx` (+ tokenizer, config) and check it against PyTorch."""
    import torch

    config = model.config
    n_layers = config.num_hidden_layers
    kv_heads, head_dim = _kv_shape(config)
    inputs, outputs = io_names(n_layers)
    # Trace with a non-empty past and s > 1 so no shape is specialised to 0 or 1.
    past_len, seq = 3, 4
    vocab = config.vocab_size
    example = (
        torch.randint(0, vocab, (1, seq)),
        torch.ones(1, past_len + seq, dtype=torch.long),
        torch.arange(past_len, past_len + seq)[None],
        *[torch.randn(1, kv_heads, past_len, head_dim) for _ in range(2 * n_layers)],
    )
    dynamic = {"input_ids": {0: "batch", 1: "sequence"},
               "attention_mask": {0: "batch", 1: "total_sequence"},
               "position_ids": {0: "batch", 1: "sequence"},
               "logits": {0: "batch", 1: "sequence"}}
    dynamic |= {n: {0: "batch", 2: "past_sequence"} for n in inputs[3:]}
    dynamic |= {n: {0: "batch", 2: "total_sequence"} for n in outputs[1:]}
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ONNX_FILE
    wrapper = _wrapper(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        torch.onnx.export(wrapper, example, str(target), input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    shared = share_tied_weights(target)
    copy_side_files(src_dir, out_dir)
    notes = [f"torch.onnx.export (TorchScript), opset {opset}, KV cache as "
             f"{2 * n_layers} past/present tensors"]
    if shared:
        notes.append(f"tied weights stored once ({', '.join(shared)} = Transpose of the "
                     "embedding)")
    return {"notes": notes}


def _initializers(graph: Any) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer}


def _same_bytes_transposed(a: Any, b: Any) -> bool:
    """a == bᵀ for two 2-D float initializers (compared in blocks to bound memory)."""
    from onnx import numpy_helper

    if len(a.dims) != 2 or list(a.dims) != list(reversed(b.dims)) or a.data_type != b.data_type:
        return False
    x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
    step = 4096
    return all(np.array_equal(x[:, i:i + step], y[i:i + step].T)
               for i in range(0, y.shape[0], step))


def share_tied_weights(path: Path) -> list[str]:
    """Rewrite `path` so a MatMul weight equal to a Gather table's transpose is not stored twice.

    Returns the initializers replaced (empty when nothing is tied; the file is then untouched).
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inits = _initializers(graph)
    tables = [inits[n.input[0]] for n in graph.node
              if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    replaced: list[str] = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1] in replaced:
            continue
        weight = inits[node.input[1]]
        table = next((t for t in tables if _same_bytes_transposed(t, weight)), None)
        if table is None:
            continue
        replaced.append(weight.name)
        graph.initializer.remove(weight)
        graph.node.insert(0, onnx.helper.make_node("Transpose", [table.name], [weight.name],
                                                   name=f"{weight.name}_tied", perm=[1, 0]))
    if replaced:
        big = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit
        onnx.save(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                  location=f"{path.name}.data")
    return replaced


def untie_transposes(model: Any) -> list[str]:
    """Undo `share_tied_weights` in a loaded ModelProto: each Transpose of an initializer becomes
    an initializer again (so weight quantizers, which only take initializer weights, see it)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    done = []
    for node in list(graph.node):
        if node.op_type == "Transpose" and node.input[0] in inits and \
                node.name.endswith("_tied"):
            arr = numpy_helper.to_array(inits[node.input[0]]).T.copy()
            graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
            graph.node.remove(node)
            done.append(node.output[0])
    return done


class OnnxRunner(Runner):
    """ONNX Runtime session over the KV-cache graph (fp32 `onnx` or 4-bit `int4`)."""

    fmt = "onnx"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        model_file = path / ONNX_FILE
        if not model_file.is_file():
            raise ConfigError(f"{model_file}: ONNX graph not found")
        cfg = read_model_config(path)
        tok = load_tokenizer_dir(path)
        super().__init__(tok, stop_ids(tok, path))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(model_file), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - corrupt or truncated graph
            raise ConfigError(f"{model_file}: ONNX Runtime cannot load it "
                              f"({type(err).__name__}: {str(err)[:200]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or heads
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        self.past: list[np.ndarray] = []
        self.length = 0

    def reset(self) -> None:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        self.past = [empty] * len(self.past_names)
        self.length = 0

    def forward(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, self.length + n), dtype=np.int64),
            "position_ids": np.arange(self.length, self.length + n, dtype=np.int64)[None],
        }
        feeds |= dict(zip(self.past_names, self.past, strict=True))
        logits, *present = self.session.run(None, feeds)
        self.past = present
        self.length += n
        return np.asarray(logits[0])

    batched = True

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int
                       ) -> list[tuple[list[int], str]]:
        """Greedy answers to `prompts` in one batch: left-padded (attention_mask 0 on the pads,
        position_ids counted from each prompt's first token), one shared KV cache; a finished
        row leaves the batch. Same tokens as `generate` one at a time, up to float rounding."""
        b = len(prompts)
        if b == 0:
            return []
        width = max(len(p) for p in prompts)
        pad = min(self.eos_ids) if self.eos_ids else 0
        ids = np.full((b, width), pad, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        pos = np.clip(mask.cumsum(1) - 1, 0, None)
        past = [np.zeros((b, self.kv_heads, 0, self.head_dim), dtype=np.float32)
                for _ in self.past_names]
        rows = np.arange(b)  # which prompt each batch row answers
        out: list[list[int]] = [[] for _ in prompts]
        finish = ["length"] * b
        while True:
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
            feeds |= dict(zip(self.past_names, past, strict=True))
            logits, *past = self.session.run(None, feeds)
            tokens = np.asarray(logits)[:, -1].argmax(-1)
            keep = []
            for j, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
                if int(tok) in self.eos_ids:
                    finish[row] = "stop"
                    continue
                out[row].append(int(tok))
                if len(out[row]) < max_new_tokens:
                    keep.append(j)
            if not keep:
                return [(o, f) for o, f in zip(out, finish, strict=True)]
            k = np.asarray(keep)
            rows, tokens = rows[k], tokens[k]
            past = [x[k] for x in past]
            mask = np.concatenate([mask[k], np.ones((len(k), 1), dtype=np.int64)], axis=1)
            pos = pos[k, -1:] + 1
            ids = tokens[:, None].astype(np.int64)

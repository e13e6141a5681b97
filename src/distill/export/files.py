"""What an artifact is made of on disk: the file each format writes, and what it weighs.

A leaf module (no distill imports): the format modules that write and read these files, the
format table (`formats.py`) that describes them, and the evaluate stage's model sizes all import
it, so none of them has to import another for a file name or a parameter count.
"""

from __future__ import annotations

import math
from pathlib import Path

MERGED_FILE = "model.safetensors"
INT8_FILE = "model.int8.safetensors"
INT4_TORCH_FILE = "model.int4.safetensors"
ONNX_FILE = "model.onnx"
GGUF_FILE = "model.gguf"

# Files that hold weights or graphs; tokenizer and config files are the same for every format
# (a few hundred KB to a few MB) and are not counted in an artifact's bytes.
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".onnx_data", ".gguf", ".data")


def weight_bytes(path: Path) -> int:
    """Bytes of the model weight/graph files of an artifact (a file or a directory).

    Only files directly in the directory count: a trained student keeps its LoRA adapter (and
    trainer checkpoints) in subfolders, which are not part of the model. The old filter dropped
    any path with an `adapter` component anywhere — including the directory's own parents, so a
    run under e.g. `/runs/adapter-sweep/` reported 0 bytes — and counted `checkpoint-*/` weights.
    """
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.iterdir()
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def dir_params(path: Path) -> int | None:
    """Parameters in a model directory, read from the safetensors headers (no weights loaded;
    tied embeddings are stored once, as `count_params` counts them); None when it has none.

    The one parameter count of a model on disk: the evaluate stage (teacher size when every
    answer came from the cache) and the export stage (teacher size for the ratios) both use it.
    """
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            total += sum(math.prod(fh.get_slice(k).get_shape())
                         for k in fh.keys())  # noqa: SIM118 - safe_open has no __iter__
    return total

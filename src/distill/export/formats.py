"""The export formats as data: one `ArtifactFormat` per format, in the `FORMATS` registry.

Each entry says what the stage, the measurement and the report would otherwise switch on by
format name: the file it writes, the runtime that loads it (the label export.json shows), the
writer and the loader, where it comes in the export order, and whether it is the fp32 student
itself. A format with a runtime switch in the config (`export.int8_runtime`,
`export.int4_runtime`) has one `Layout` per choice; a directory written earlier is recognised by
its file.

Writers and loaders import their format module when called, not when this table is imported:
`distill chat --format gguf` and the report never pay for torch or ONNX, and the format modules
depend on `runtime.py` and `files.py` only — nothing imports this module back.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from distill.config import ConfigError, ExportConfig, PipelineConfig
from distill.export.files import GGUF_FILE, INT4_TORCH_FILE, INT8_FILE, MERGED_FILE, ONNX_FILE
from distill.export.runtime import Runner


@dataclass(frozen=True)
class WriteJob:
    """What every writer starts from: the fp32 model in memory (pruned when asked), the merged
    directory it was saved to (weights, tokenizer, config), the export directory and the config."""

    model: Any
    merged_dir: Path
    out: Path
    cfg: PipelineConfig

    @property
    def e(self) -> ExportConfig:
        assert self.cfg.export is not None
        return self.cfg.export


Writer = Callable[[WriteJob, Path], dict[str, Any]]
"""Writes one artifact into the directory given; returns its info: `notes` (list, into
export.json), and optionally `skipped` (why nothing was written), `unmeasured` (why it is not
measured), `roundtrip` (a file read back: its `max_abs_diff`), `writer`."""


class Loader(Protocol):
    def __call__(self, path: Path, *, threads: int | None, gguf_backend: str) -> Runner:
        """The artifact in `path` loaded in its runtime; a broken one is a ConfigError."""


@dataclass(frozen=True)
class Layout:
    """One way a format is stored and run."""

    file: str
    """The weight/graph file written (tokenizer and config files beside it are the same for
    every format)."""
    runtime: str
    """export.json's `runtime` (a runner may say more once loaded: `Runner.describe`)."""
    load: Loader
    write: Writer | None
    """None: the fp32 base, saved before any format (`merge.export_merged`)."""
    rank: int
    """Export order: onnx before anything quantized from its graph."""
    choice: str = ""
    """The value of the format's config switch that selects this layout."""


@dataclass(frozen=True)
class ArtifactFormat:
    name: str
    layouts: tuple[Layout, ...]
    """In the order a directory is recognised by its file; the last one is assumed when none of
    their files is there (its loader then names what is missing)."""
    switch: str | None = None
    """The `export.*` field whose value picks the layout to write."""
    fp32: bool = False
    """The fp32 student itself, saved first as the base of every other format: its accuracy is
    the yardstick of the others, it is kept only when asked for, and the report's plot shows it
    once (as the fp32 student)."""

    def layout_for(self, e: ExportConfig) -> Layout:
        """The layout the config asks for."""
        choice = str(getattr(e, self.switch)) if self.switch else ""
        return next(lay for lay in self.layouts if lay.choice == choice)

    def layout_in(self, path: Path) -> Layout:
        """The layout of the artifact already in `path`."""
        return next((lay for lay in self.layouts if (path / lay.file).is_file()),
                    self.layouts[-1])


# Loaders and writers: each imports its format module at call time.

def _load_merged(path: Path, *, threads: int | None, gguf_backend: str) -> Runner:
    from distill.export.merge import load_merged_runner

    return load_merged_runner(path, threads=threads)


def _load_int8(path: Path, *, threads: int | None, gguf_backend: str) -> Runner:
    from distill.export.quantize import load_int8_runner

    return load_int8_runner(path, threads=threads)


def _load_int4_torch(path: Path, *, threads: int | None, gguf_backend: str) -> Runner:
    from distill.export.quantize import load_int4_runner

    return load_int4_runner(path, threads=threads)


def _load_onnx(path: Path, *, threads: int | None, gguf_backend: str) -> Runner:
    from distill.export.onnx_export import OnnxRunner

    return OnnxRunner(path, threads=threads)


def _load_gguf(path: Path, *, threads: int | None, gguf_backend: str) -> Runner:
    from distill.export.gguf_runtime import load_gguf_runner

    return load_gguf_runner(path, threads=threads, backend=gguf_backend)


def _write_int8(job: WriteJob, path: Path) -> dict[str, Any]:
    from distill.export.quantize import export_int8

    return export_int8(job.model, job.merged_dir, path)


def _write_onnx(job: WriteJob, path: Path) -> dict[str, Any]:
    from distill.export.onnx_export import export_onnx

    return export_onnx(job.model, job.merged_dir, path, job.e.onnx_opset)


def _write_int4_torch(job: WriteJob, path: Path) -> dict[str, Any]:
    from distill.export.quantize import export_int4_torch

    return export_int4_torch(job.model, job.merged_dir, path, job.e.int4_block_size,
                             job.e.int4_keep_int8)


def _write_nbits(job: WriteJob, path: Path, bits: int, block: int) -> dict[str, Any]:
    """ORT MatMulNBits weights from the fp32 ONNX graph: the onnx artifact when it was exported
    (it comes first), else a temporary graph removed afterwards."""
    from distill.export import quantize
    from distill.export.onnx_export import export_onnx

    reason = quantize.int4_available()
    if reason:
        return {"skipped": reason}
    src = job.out / ONNX.name
    if not (src / ONNX_FILE).is_file():
        src = job.out / ".onnx-fp32"
        export_onnx(job.model, job.merged_dir, src, job.e.onnx_opset)
    try:
        return quantize.export_nbits(src, path, bits, block)
    finally:
        if src.name == ".onnx-fp32":
            shutil.rmtree(src, ignore_errors=True)


def _write_int8_ort(job: WriteJob, path: Path) -> dict[str, Any]:
    return _write_nbits(job, path, 8, 32)


def _write_int4_ort(job: WriteJob, path: Path) -> dict[str, Any]:
    return _write_nbits(job, path, 4, job.e.int4_block_size)


def _write_gguf(job: WriteJob, path: Path) -> dict[str, Any]:
    from distill.export.gguf_export import write_gguf

    e = job.e
    return write_gguf(job.merged_dir, path, qtype=e.gguf_type, pre=e.gguf_pre,
                      name=job.cfg.name, converter=e.gguf_converter)


MERGED = ArtifactFormat("merged", (
    Layout(MERGED_FILE, "PyTorch (fp32)", _load_merged, None, rank=0),), fp32=True)
INT8 = ArtifactFormat("int8", (
    Layout(ONNX_FILE, "ONNX Runtime MatMulNBits 8-bit (CPU)", _load_onnx, _write_int8_ort,
           rank=3, choice="onnxruntime"),
    Layout(INT8_FILE, "PyTorch, int8 weights (per channel) dequantized to fp32 at load",
           _load_int8, _write_int8, rank=1, choice="torch"),
), switch="int8_runtime")
INT4 = ArtifactFormat("int4", (
    Layout(INT4_TORCH_FILE, "PyTorch, int4 weights (fp16 scale per group) dequantized to fp32 "
           "at load", _load_int4_torch, _write_int4_torch, rank=4, choice="torch"),
    Layout(ONNX_FILE, "ONNX Runtime MatMulNBits (CPU)", _load_onnx, _write_int4_ort, rank=4,
           choice="onnxruntime"),
), switch="int4_runtime")
ONNX = ArtifactFormat("onnx", (
    Layout(ONNX_FILE, "ONNX Runtime (CPU)", _load_onnx, _write_onnx, rank=2),))
GGUF = ArtifactFormat("gguf", (
    Layout(GGUF_FILE, "llama.cpp", _load_gguf, _write_gguf, rank=5),))

FORMATS: dict[str, ArtifactFormat] = {f.name: f for f in (MERGED, INT8, INT4, ONNX, GGUF)}
"""Every format, by name (the names `export.formats` and `--format` accept)."""


def get_format(name: str) -> ArtifactFormat:
    if name not in FORMATS:
        raise ConfigError(f"--format {name}: unknown format (expected one of "
                          f"{', '.join(FORMATS)})")
    return FORMATS[name]


def base_format() -> ArtifactFormat:
    """The fp32 format every other one is made from (merged)."""
    return next(f for f in FORMATS.values() if f.fp32)


def export_plan(e: ExportConfig) -> list[tuple[ArtifactFormat, Layout]]:
    """The formats of `export.formats`, each with its configured layout, in export order."""
    plan = [(f, f.layout_for(e)) for f in FORMATS.values() if f.name in e.formats]
    return sorted(plan, key=lambda p: p[1].rank)


def load_runner(fmt: str, path: Path, *, threads: int | None = None,
                gguf_backend: str = "auto") -> Runner:
    """Load an exported artifact in its own runtime; a broken or missing one is a ConfigError."""
    spec = get_format(fmt)
    if not path.exists():
        raise ConfigError(f"{path}: no {fmt} artifact here (run `distill export` with "
                          f"export.formats including {fmt})")
    runner = spec.layout_in(path).load(path, threads=threads, gguf_backend=gguf_backend)
    runner.fmt = fmt
    return runner

"""Host-memory settings for training on CPU (same math, lower peak RSS).

Measured on SmolLM2-135M, LoRA, batch 4 x 512 tokens (README, "Training memory"):

- TRL's fused LM head scores the vocabulary in tiles of 32,768 columns. On CUDA a Triton kernel
  folds each tile in place; on CPU the fallback runs torch ops that allocate several
  [tokens, 32768] fp32 temporaries per tile: +2.4 GB in the backward pass at 2,048 tokens.
  Tiles of 4,096 columns: +0.5 GB, the same online log-sum-exp.
- Activations: without checkpointing, LoRA on SmolLM2-135M held ~2.9 MB per token of a
  micro-batch (8 x 256 tokens: 6.4 GB peak off, 3.5 GB on, before the malloc setting below);
  `activation_bytes_per_token` estimates it from depth and widths for `gradient_checkpointing:
  auto`.
- glibc's malloc raises its mmap threshold as large blocks are freed, after which freed
  activations stay in the heap: RSS held 3.7 GB after a step whose live set was 0.6 GB. A fixed
  threshold returns large blocks to the system when they are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

from distill.config import PipelineConfig

CPU_VOCAB_TILE = 4096
"""Vocabulary columns per tile of TRL's fused LM head on CPU."""
MALLOC_THRESHOLD = 16 << 20
"""Blocks of 16 MiB and more are mmapped (and returned on free); the heap is trimmed above it.
At 1 MiB every activation of a step was a fresh mmap that the kernel zero-filled page by page:
LoRA on SmolLM2-135M, 8 rows of ~131 tokens, took 13.65 s per step against 8.72 s unset and
8.96 s at 16 MiB (peak RSS 3.3 / 4.7 / 4.6 GB, checkpointing off)."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def small_vocab_tiles(tile: int = CPU_VOCAB_TILE) -> bool:
    """Narrow TRL's fused-head vocabulary tiles (a module constant read per call); True when
    set. TRL versions without the constant are left alone."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    if not hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        return False
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(tile, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    return True


def return_freed_memory(threshold: int = MALLOC_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds, so freed activations leave the process; True when
    set (Linux with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, threshold))


def cpu_training_memory() -> None:
    """Both settings, when training runs on the CPU (on CUDA the host holds little)."""
    import torch

    if torch.cuda.is_available():
        return
    small_vocab_tiles()
    return_freed_memory()


def activation_bytes_per_token(model_config: Any) -> int:
    """Activation bytes one token of a micro-batch holds for the backward pass without
    checkpointing: per layer ~16 hidden-width and ~10 MLP-width fp32 tensors (calibrated on
    SmolLM2-135M + LoRA: 30 x (16 x 576 + 10 x 1536) x 4 B = 2.95 MB, measured 2.9 MB)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") \
        else model_config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inter = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    return layers * (16 * hidden + 10 * inter) * 4


def use_activation_checkpointing(cfg: PipelineConfig, model: Any = None) -> bool:
    """`train.gradient_checkpointing` resolved: auto is on when `batch_size` x `max_length`
    tokens would hold more than `activation_memory_gb` of activations (on without a model to
    size)."""
    t = cfg.train
    if t.gradient_checkpointing != "auto":
        return bool(t.gradient_checkpointing)
    config = getattr(model, "config", None)
    if config is None:
        return True
    need = t.batch_size * t.max_length * activation_bytes_per_token(config)
    return need > t.activation_memory_gb * 1e9

"""Host-memory settings for training on CPU (same math, lower peak RSS).

Measured on SmolLM2-135M, LoRA, batch 4 x 512 tokens (README, "Training memory"):

- TRL's fused LM head scores the vocabulary in tiles of 32,768 columns. On CUDA a Triton kernel
  folds each tile in place; on CPU the fallback runs torch ops that allocate several
  [tokens, 32768] fp32 temporaries per tile: +2.4 GB in the backward pass at 2,048 tokens.
  Tiles of 4,096 columns: +0.5 GB, the same online log-sum-exp.
- glibc's malloc raises its mmap threshold as large blocks are freed, after which freed
  activations stay in the heap: RSS held 3.7 GB after a step whose live set was 0.6 GB. A fixed
  threshold returns large blocks to the system when they are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

CPU_VOCAB_TILE = 4096
"""Vocabulary columns per tile of TRL's fused LM head on CPU."""
MALLOC_THRESHOLD = 1 << 20
"""Blocks of 1 MiB and more are mmapped (and returned on free); the heap is trimmed above it."""

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

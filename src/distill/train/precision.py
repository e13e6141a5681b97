"""Which precision a student trains in (`train.bf16: auto | true | false`).

bf16 pays only where the hardware multiplies it natively. On CPU that is AVX512-BF16 (AMD Zen 4+,
Intel Cooper Lake) or AMX (Intel Sapphire Rapids+): bf16 matmuls there run ~4x fp32. A CPU with
AVX2 only has no bf16 arithmetic and oneDNN falls back to slow conversions: measured on an AMD
EPYC with AVX2 only (2 cores), a [1024, 576] x [576, 1536] matmul ran 66 GFLOP/s in fp32 and
0.5 GFLOP/s in bf16. So `auto` reads the CPU's flags and, where they promise bf16, checks it with
a short matmul timing (a VM can hide what the flags say), once per process.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

from distill.config import PipelineConfig

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs with native bf16 matrix arithmetic."""
MIN_SPEEDUP = 1.3
"""bf16 must beat fp32 by this much on the timing check to be chosen."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first CPU's feature flags (x86 `flags`, Arm `Features`); empty where unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def matmul_gflops(dtype: object, n: int = 512, seconds: float = 0.15,
                  shape: tuple[int, int, int] | None = None) -> float:
    """Achieved GFLOP/s of an [m, k] x [k, n] matmul (`shape`, default [n, n] x [n, n]) in
    `dtype` on the current threads."""
    import torch

    assert isinstance(dtype, torch.dtype)
    m, k, cols = shape or (n, n, n)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, cols, dtype=dtype)
    a @ b  # warm-up: oneDNN picks and caches its kernel on the first call
    reps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        a @ b
        reps += 1
    return 2 * m * k * cols * reps / elapsed / 1e9


@cache
def cpu_bf16_fast() -> bool:
    """True when this CPU multiplies bf16 natively and measurably faster than fp32."""
    import torch

    if not cpu_flags() & set(BF16_FLAGS):
        return False
    return matmul_gflops(torch.bfloat16) >= MIN_SPEEDUP * matmul_gflops(torch.float32)


def use_bf16(cfg: PipelineConfig) -> bool:
    """`train.bf16` resolved for the device training runs on."""
    setting = cfg.train.bf16
    if setting != "auto":
        return bool(setting)
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return cpu_bf16_fast()

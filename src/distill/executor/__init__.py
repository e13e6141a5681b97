"""Where the heavy work runs: this process (`executor.kind: local`) or a Ray cluster (`ray`).

Nothing here imports Ray at module level: a local run never needs it. The stages call
`is_ray(cfg)` and, only then, the `ray_*` modules beside this one:

    generate   ray_generate   seeds split into shards, one Ray task per shard (rows + cache each)
    generate   ray_vllm       teacher.backend vllm: a vLLM fleet through Ray Data LLM
    evaluate   ray_evaluate   each model's held-out items split into shards the same way
    filter     ray_dedup      near-dedup (MinHash LSH) on Ray Data
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import ConfigError, ExecutorConfig, PipelineConfig

RAY_MISSING = "executor.kind: ray needs Ray; pip install -e '.[ray]'"


def is_ray(cfg: PipelineConfig) -> bool:
    return cfg.executor.kind == "ray"


def check_executor(cfg: PipelineConfig, stages: list[str]) -> None:
    """Before anything runs (`preflight`): Ray is installed, and generate on Ray is work that
    shards (Ray is looked up, not imported: that costs seconds)."""
    import importlib.util
    import sys

    if not {"generate", "filter", "evaluate"} & set(stages):
        return
    if "generate" in stages and not cfg.generate.source:
        from distill.executor.ray_generate import check_supported

        check_supported(cfg)
    loaded = "ray" in sys.modules
    if (sys.modules["ray"] is None) if loaded else importlib.util.find_spec("ray") is None:
        raise ConfigError(RAY_MISSING)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ConfigError(RAY_MISSING) from err
    return ray


def connect(ex: ExecutorConfig) -> Any:
    """The `ray` module, connected as `executor.address` says (once per process: a driver that
    already called `ray.init`, a test or a notebook, keeps its connection)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "runtime_env": ex.runtime_env}
    if ex.address is None:
        kwargs["num_cpus"] = ex.local_cpus
    else:
        kwargs["address"] = ex.address
    try:
        ray.init(**kwargs)
    except ConnectionError as err:
        raise ConfigError(f"executor.address: no Ray cluster at {ex.address!r} ({err})") from None
    return ray


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) index ranges of at most `shards` non-empty shards of n items.

    A pure function of (n, shards): every rerun, and every node, puts an item in the same shard,
    and concatenating the shards in order restores the items' order (the merged rows come out
    as the local path writes them)."""
    k = max(1, min(shards, n))
    return [(i * n // k, (i + 1) * n // k) for i in range(k)] if n else []


def shard_dir(root: Path, stage: str, n_shards: int, index: int) -> Path:
    """`<run>/shards/<stage>/of-<n>/<index>`: beside the stage's output, never inside it (a
    stage's output directory is replaced in one rename when the stage finishes)."""
    return root / "shards" / stage / f"of-{n_shards}" / f"{index:05d}"


def unwrap_task_error(err: BaseException) -> BaseException:
    """The user-facing error inside a Ray task failure: a ConfigError raised in a shard stays a
    ConfigError with its one line (the CLI prints it and exits 2)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, ConfigError):
        return ConfigError(str(cause))
    return err

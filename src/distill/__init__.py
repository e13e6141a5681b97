"""distill: distill a teacher LLM's reasoning into a small student that runs on the edge.

The Python API mirrors the CLI: `Pipeline.from_yaml(path).run()` is `distill run path`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill.api import Pipeline
    from distill.config import ConfigError, PipelineConfig, load_config

__all__ = ["ConfigError", "Pipeline", "PipelineConfig", "load_config"]


def __getattr__(name: str) -> Any:
    """Lazy: `import distill` stays light (no torch, no transformers)."""
    if name == "Pipeline":
        from distill.api import Pipeline

        return Pipeline
    if name in ("ConfigError", "PipelineConfig", "load_config"):
        import distill.config as config

        return getattr(config, name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")

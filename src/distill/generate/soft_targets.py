"""Soft targets (`teacher.top_logprobs`): does training need them, and did the teacher send them?

An OpenAI-compatible server may ignore `logprobs` and still answer 200 (`transformers serve`
does). The rows then carry no soft targets, and `train.method: kd` would only fail at train time,
after the whole generation budget is spent. When training needs the stored top-k, the teacher
stops sending after the first responses without them and the generate stage fails with a
ConfigError; otherwise the stage warns and the manifest records it (`soft_targets`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from distill.config import ConfigError, PipelineConfig

log = logging.getLogger(__name__)

MISSING = "missing: server returned no logprobs"


def kd_needs_stored(cfg: PipelineConfig) -> str | None:
    """The setting that trains KD on stored soft targets (e.g. "train.method kd"), or None
    (no top_logprobs asked for, or no train stage in `stages`).

    KD reads the stored top-k unless `train.kd.soft_targets` is "teacher", or is "auto" with a
    local teacher to fall back on. GKD scores with the local teacher only, never stored ones.
    """
    from distill.train.common import local_teacher_name

    t = cfg.train
    if cfg.teacher.top_logprobs <= 0 or "train" not in cfg.stages:
        return None
    if t.kd.soft_targets == "teacher":
        return None
    if t.kd.soft_targets == "auto" and local_teacher_name(cfg) is not None:
        return None
    if t.method == "kd":
        return "train.method kd"
    return "train.also kd" if "kd" in t.also else None


def teacher_options(cfg: PipelineConfig) -> dict[str, Any]:
    """Keyword arguments for `make_teacher`: the openai backend stops on missing logprobs when
    training needs them."""
    if cfg.teacher.backend == "openai" and kd_needs_stored(cfg):
        return {"require_logprobs": True}
    return {}


def count_missing(cfg: PipelineConfig, rows: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(rows without soft targets, rows with a response), when `top_logprobs` asked for them."""
    if cfg.teacher.top_logprobs <= 0:
        return 0, 0
    answered = [r for r in rows if not r.get("error")]
    return sum(r.get("top_logprobs") is None for r in answered), len(answered)


def _where(cfg: PipelineConfig) -> str:
    url = cfg.teacher.base_url
    urls = ", ".join(url) if isinstance(url, list) else url
    return f"the {cfg.teacher.backend} teacher" + (f" at {urls}" if urls else "")


def enforce(cfg: PipelineConfig, rows: Sequence[Mapping[str, Any]]) -> None:
    """ConfigError when training needs stored soft targets and some rows came back without."""
    need = kd_needs_stored(cfg)
    missing, answered = count_missing(cfg, rows)
    stopped = sum(r.get("error_kind") == "missing_logprobs" for r in rows)
    if need is None or not (missing or stopped):
        return
    raise ConfigError(
        f"teacher.top_logprobs: {cfg.teacher.top_logprobs}, but {_where(cfg)} returned no "
        f"logprobs ({missing} of {answered} responses; it ignores `logprobs`, as `transformers "
        f"serve` does), and {need} needs them as soft targets. Stopped after the first "
        f"responses ({stopped} requests not sent). Use a server that returns logprobs (vLLM, "
        "SGLang, OpenAI), give KD a local teacher (train.kd.teacher_model), or set "
        "teacher.top_logprobs: 0")


def manifest_note(cfg: PipelineConfig, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the manifest says about soft targets (nothing when none were asked for); warns when
    some are missing."""
    if cfg.teacher.top_logprobs <= 0:
        return {}
    missing, answered = count_missing(cfg, rows)
    if not missing:
        return {"soft_targets": f"top-{cfg.teacher.top_logprobs} logprobs"}
    log.warning("generate: %s on %d of %d responses (teacher.top_logprobs is set); the rows "
                "carry no soft targets", MISSING, missing, answered)
    return {"soft_targets": MISSING, "soft_targets_missing": f"{missing} of {answered}"}

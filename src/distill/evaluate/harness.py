"""lm-evaluation-harness (`lm-eval`) on the evaluate stage's models, beside our own accuracy.

Our own scorer answers with the pipeline's chat prompt and checks the final answer; the harness
scores the same models the way published tables do (its task prompts, few-shot examples and
answer filters), so a distilled student can be compared with numbers reported elsewhere.

Models are handed to the harness as loaded objects (`HFLM(pretrained=model, tokenizer=tok)`):
the base student may exist only in memory (`train.student_config`), and a local teacher is not
loaded twice. Shipped tasks (`harness_tasks/*.yaml`) read local files: their `data_files` are
rewritten to absolute paths under the project root and the resolved YAMLs are written to
`<run>/evaluate/harness_tasks/`, so a run records exactly what it evaluated and never needs the
Hub. Only tasks that are neither shipped nor in `include_path` load the harness's own (7 s to
index, and those may download their data).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from distill.config import ConfigError, PipelineConfig

SHIPPED = Path(__file__).parent / "harness_tasks"
INSTALL_HINT = "pip install lm-eval (the distill extra \"eval\")"


def check_available() -> None:
    """ConfigError when `evaluate.harness` is set and lm-eval is not installed: say so before
    any model is scored, not after the stage's long part."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"evaluate.harness: lm-evaluation-harness is not installed; "
                          f"{INSTALL_HINT}, or remove evaluate.harness")


def shipped_tasks() -> dict[str, Path]:
    """{task name: YAML} of the tasks distill ships."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}


def resolve_task_yaml(src: Path, cfg: PipelineConfig, out_dir: Path) -> Path:
    """Copy a shipped task YAML to `out_dir` with its `data_files` made absolute (resolved
    against the project root); a missing data file is a ConfigError naming it."""
    spec = yaml.safe_load(src.read_text())
    files = spec.get("dataset_kwargs", {}).get("data_files", {})
    for split, rel in files.items():
        path = cfg.resolve(rel).resolve()
        if not path.exists():
            raise ConfigError(f"evaluate.harness: task {spec['task']}: {split} split file not "
                              f"found: {rel} (looked in {path.parent})")
        files[split] = str(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / src.name
    out.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return out


def task_manager(cfg: PipelineConfig, out_dir: Path) -> Any:
    """A TaskManager that knows every task in `evaluate.harness.tasks`; ConfigError naming the
    unknown ones."""
    from lm_eval.tasks import TaskManager

    h = _harness(cfg)
    shipped = shipped_tasks()
    for name in h.tasks:
        if name in shipped:
            resolve_task_yaml(shipped[name], cfg, out_dir)
    paths: list[str] = [str(out_dir)] if out_dir.is_dir() else []
    if h.include_path:
        inc = cfg.resolve(h.include_path)
        if not inc.is_dir():
            raise ConfigError(f"evaluate.harness.include_path: not a folder: {h.include_path}")
        paths.append(str(inc))
    tm = TaskManager(include_path=paths or None, include_defaults=False)
    if not set(h.tasks) <= set(tm.all_tasks):
        tm = TaskManager(include_path=paths or None, include_defaults=True)
    unknown = [t for t in h.tasks if t not in tm.all_tasks]
    if unknown:
        raise ConfigError(f"evaluate.harness.tasks: unknown task(s) {', '.join(unknown)}; "
                          f"shipped: {', '.join(shipped)} (or add include_path)")
    return tm


def _harness(cfg: PipelineConfig) -> Any:
    assert cfg.evaluate is not None and cfg.evaluate.harness is not None
    return cfg.evaluate.harness


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from `simple_evaluate`'s `results`: numbers only (the harness
    writes "N/A" for a stderr it did not compute), as plain floats rounded to 4 places."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results.items():
        scores = {}
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and \
                    key != "sample_len" and math.isfinite(float(value)):
                scores[key] = round(float(value), 4)
        out[task] = scores
    return out


class HarnessRunner:
    """Runs the configured tasks on one model at a time; keeps scores and a per-model record."""

    def __init__(self, cfg: PipelineConfig, out_dir: Path) -> None:
        check_available()
        self.cfg = cfg
        self.out_dir = out_dir
        self.tm = task_manager(cfg, out_dir / "harness_tasks")
        self.scores: dict[str, dict[str, dict[str, float]]] = {}
        self.info: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, model: Any, tok: Any) -> dict[str, dict[str, float]]:
        """Score one loaded model on every task (greedy, as the tasks say; answers capped at
        evaluate.max_tokens); write `<out>/harness/<name>.json` with the harness's own record."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        e = self.cfg.evaluate
        assert e is not None
        h = _harness(self.cfg)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=e.batch_size,
                  device=str(model.device))
        t0 = time.perf_counter()
        res = simple_evaluate(
            model=lm, tasks=list(h.tasks), num_fewshot=h.num_fewshot, limit=h.limit,
            task_manager=self.tm, bootstrap_iters=e.bootstrap, log_samples=False,
            apply_chat_template=h.apply_chat_template,
            fewshot_as_multiturn=h.apply_chat_template,
            gen_kwargs={"max_gen_toks": e.max_tokens}, random_seed=self.cfg.seed,
            numpy_random_seed=self.cfg.seed, torch_random_seed=self.cfg.seed,
            fewshot_random_seed=self.cfg.seed)
        if res is None:  # only on non-zero ranks of a distributed run
            return {}
        self.scores[name] = task_scores(res["results"])
        self._record(name, res, time.perf_counter() - t0)
        return self.scores[name]

    def _record(self, name: str, res: dict[str, Any], seconds: float) -> None:
        import lm_eval

        self.seconds[name] = round(seconds, 2)
        tasks = {t: {"n": (res.get("n-samples") or {}).get(t, {}).get("effective"),
                     "num_fewshot": (res.get("n-shot") or {}).get(t)}
                 for t in res["results"]}
        self.info = {"lm_eval_version": lm_eval.__version__, "tasks": tasks,
                     "limit": _harness(self.cfg).limit,
                     "apply_chat_template": _harness(self.cfg).apply_chat_template,
                     "seconds": self.seconds}
        path = self.out_dir / "harness" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = {k: res.get(k) for k in ("results", "n-shot", "n-samples", "versions", "configs",
                                        "lm_eval_version")}
        path.write_text(json.dumps(keep | {"seconds": round(seconds, 2)}, indent=1,
                                   default=str))

"""Loading seed questions (and held-out sets) from files or procedural tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.config import ConfigError, PipelineConfig, TaskSource
from distill.records import read_jsonl


def read_rows(path: Path, field: str = "seeds.path") -> list[dict[str, Any]]:
    """jsonl, json (a list of objects) or parquet → list of dicts; bad input names the file."""
    if not path.exists():
        raise ConfigError(f"{field}: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON list of objects")
        return data
    if suffix == ".parquet":
        from datasets import Dataset

        return Dataset.from_parquet(str(path)).to_list()
    if path.is_dir():
        from datasets import load_from_disk

        return load_from_disk(str(path)).to_list()
    raise ConfigError(f"{field}: {path}: unsupported format (expected .jsonl, .json or .parquet)")


def task_rows(src: TaskSource) -> list[dict[str, Any]]:
    from distill.tasks import TASKS, make_task

    if src.name not in TASKS:
        raise ConfigError(f"task.name: unknown task {src.name!r}; known: {', '.join(TASKS)}")
    return make_task(src.name, src.split, src.n, src.seed)


def normalize(rows: list[dict[str, Any]], *, question_field: str, answer_field: str | None,
              id_field: str | None, source: str, where: str) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rows):
        if question_field not in r or not str(r[question_field]).strip():
            raise ConfigError(f"{where}: row {i + 1}: missing field {question_field!r}")
        gold = r.get(answer_field) if answer_field else None
        rid = r.get(id_field) if id_field else None
        out.append({
            "id": str(rid) if rid is not None else f"{source}-{i}",
            "question": str(r[question_field]).strip(),
            "answer": None if gold is None else str(gold),
            "source": source,
        })
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: {id_field}: ids are not unique")
    return out


def load_seeds(cfg: PipelineConfig) -> list[dict[str, Any]]:
    s = cfg.seeds
    if s.task is not None:
        rows = task_rows(s.task)
        source = s.source or s.task.name
        rows = normalize(rows, question_field="question", answer_field="answer", id_field="id",
                         source=source, where="seeds.task")
    else:
        path = cfg.resolve(s.path or "")
        rows = normalize(read_rows(path), question_field=s.question_field,
                         answer_field=s.answer_field, id_field=s.id_field,
                         source=s.source or path.stem, where=str(s.path))
    return rows[: s.limit] if s.limit else rows


def load_eval_set(cfg: PipelineConfig) -> list[dict[str, Any]]:
    e = cfg.evaluate
    if e is None:
        raise ConfigError("evaluate: section missing")
    if e.task is not None:
        rows = normalize(task_rows(e.task), question_field="question", answer_field="answer",
                         id_field="id", source=e.task.name, where="evaluate.task")
    elif e.dataset:
        path = cfg.resolve(e.dataset)
        rows = normalize(read_rows(path, "evaluate.dataset"), question_field=e.question_field,
                         answer_field=e.answer_field, id_field=None, source=path.stem,
                         where=str(e.dataset))
    else:
        raise ConfigError("evaluate: set evaluate.dataset or evaluate.task")
    return rows[: e.limit] if e.limit else rows

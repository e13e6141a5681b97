"""Loading seed questions (and held-out sets) from files or procedural tasks.

Seed files are read as a stream (`iter_seeds`): one row at a time, so loading 1M seeds holds the
normalized seeds and the id index, never the raw file or a second copy of it. Bad input is
exit 2 naming the place (`FILE:LINE` for jsonl, `FILE: row N` for json / parquet):

- bytes that are not UTF-8 (the line, the column and the byte);
- a question or gold answer above `MAX_FIELD_CHARS` characters (no teacher's context holds it);
- an id seen before (both places).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from distill.config import ConfigError, PipelineConfig, TaskSource
from distill.records import loads

MAX_FIELD_CHARS = 1_000_000
"""The most characters a seed's question or gold answer may have (~250k tokens, beyond any
teacher's context window): a longer one is refused with exit 2 naming its line, not sent."""


def _not_utf8(where: str, data: bytes, err: UnicodeDecodeError) -> ConfigError:
    bad = data[err.start:err.start + 1].hex()
    line_start = data.rfind(b"\n", 0, err.start) + 1
    return ConfigError(f"{where}: not UTF-8 (byte 0x{bad} at column {err.start - line_start + 1}); "
                       "expected UTF-8 text: re-encode the file (e.g. `iconv -f latin1 -t utf-8`)")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    name = str(path)
    with open(path, "rb") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = loads(line)  # orjson checks UTF-8; the decode below only says where
            except json.JSONDecodeError as err:
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    raise _not_utf8(f"{name}:{i}", line, bad) from None
                raise ConfigError(f"{name}:{i}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{name}:{i}: expected a JSON object per line")
            yield f"{name}:{i}", row


def _read_json(path: Path) -> list[Any]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise _not_utf8(f"{path}:{line}", data, err) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: expected a JSON list of objects")
    return rows


def iter_rows(path: Path, field: str = "seeds.path") -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of a jsonl (streamed), json (a list of objects), parquet file or saved
    dataset; `where` names the line (jsonl) or row for error messages."""
    if not path.exists():
        raise ConfigError(f"{field}: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
        return
    if suffix == ".json":
        rows: Iterable[Any] = _read_json(path)
    elif suffix == ".parquet":
        from datasets import Dataset

        rows = Dataset.from_parquet(str(path))
    elif path.is_dir():
        from datasets import load_from_disk

        rows = load_from_disk(str(path))
    else:
        raise ConfigError(f"{field}: {path}: unsupported format (expected .jsonl, .json or "
                          ".parquet)")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: row {i}: expected a JSON object")
        yield f"{path}: row {i}", row


def read_rows(path: Path, field: str = "seeds.path") -> list[dict[str, Any]]:
    """jsonl, json (a list of objects) or parquet → list of dicts; bad input names the file."""
    return [row for _, row in iter_rows(path, field)]


def task_rows(src: TaskSource) -> list[dict[str, Any]]:
    from distill.tasks import TASKS, make_task

    if src.name not in TASKS:
        raise ConfigError(f"task.name: unknown task {src.name!r}; known: {', '.join(TASKS)}")
    return make_task(src.name, src.split, src.n, src.seed)


def iter_normalized(rows: Iterable[tuple[str, dict[str, Any]]], *, question_field: str,
                    answer_field: str | None, id_field: str | None, source: str
                    ) -> Iterator[dict[str, Any]]:
    """Seed rows {id, question, answer, source} from (where, raw row), one at a time. Grows only
    by the id index (a set of the ids seen, and where: to name both lines of a duplicate)."""
    seen: dict[str, str] = {}
    for i, (where, r) in enumerate(rows):
        if question_field not in r or not str(r[question_field]).strip():
            raise ConfigError(f"{where}: missing field {question_field!r}")
        question = str(r[question_field]).strip()
        gold = r.get(answer_field) if answer_field else None
        answer = None if gold is None else str(gold)
        for name, value in ((question_field, question), (answer_field, answer)):
            if value is not None and len(value) > MAX_FIELD_CHARS:
                raise ConfigError(f"{where}: field {name!r} has {len(value):,} characters; the "
                                  f"limit for a seed is {MAX_FIELD_CHARS:,} (no teacher's "
                                  "context holds more): shorten or drop the row")
        rid = r.get(id_field) if id_field else None
        sid = str(rid) if rid is not None else f"{source}-{i}"
        if sid in seen:
            raise ConfigError(f"{where}: {id_field or 'id'}: duplicate id {sid[:80]!r}, first at "
                              f"{seen[sid]}; ids must be unique")
        seen[sid] = where
        yield {"id": sid, "question": question, "answer": answer, "source": source}


def normalize(rows: list[dict[str, Any]], *, question_field: str, answer_field: str | None,
              id_field: str | None, source: str, where: str) -> list[dict[str, Any]]:
    return list(iter_normalized(((f"{where}: row {i}", r) for i, r in enumerate(rows, 1)),
                                question_field=question_field, answer_field=answer_field,
                                id_field=id_field, source=source))


def iter_seeds(cfg: PipelineConfig) -> Iterator[dict[str, Any]]:
    """The seeds, streamed: a file is read one row at a time, and no further than
    `seeds.limit`."""
    s = cfg.seeds
    if s.task is not None:
        raw = ((f"seeds.task: row {i}", r) for i, r in enumerate(task_rows(s.task), 1))
        rows = iter_normalized(raw, question_field="question", answer_field="answer",
                               id_field="id", source=s.source or s.task.name)
    else:
        path = cfg.resolve(s.path or "")
        rows = iter_normalized(iter_rows(path), question_field=s.question_field,
                               answer_field=s.answer_field, id_field=s.id_field,
                               source=s.source or path.stem)
    return islice(rows, s.limit) if s.limit else rows


def load_seeds(cfg: PipelineConfig) -> list[dict[str, Any]]:
    return list(iter_seeds(cfg))
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

"""Writing a stage's output: a `datasets` dataset plus a jsonl, atomically, into the run dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.config import ConfigError
from distill.damage import DamagedState, writing
from distill.records import atomic_path, dumps, loads, read_jsonl, write_jsonl

if TYPE_CHECKING:  # `datasets` costs ~0.7 s to import: loaded where a dataset is made or read
    from datasets import Dataset

# Columns whose shape varies row to row (Arrow wants one type per column): stored as JSON text in
# the dataset, as real JSON in the jsonl.
JSON_COLUMNS = ("scores", "top_logprobs", "extra")


def _column(rows: list[dict[str, Any]], key: str) -> list[Any]:
    if key not in JSON_COLUMNS:
        return [r.get(key) for r in rows]
    return [dumps(r[key]) if key in r and not isinstance(r[key], str) else r.get(key)
            for r in rows]


def to_dataset(rows: list[dict[str, Any]]) -> Dataset:
    """`Dataset.from_list(rows)` with the JSON columns as text, built column by column (what
    `from_list` does) so that no second copy of every row is made on the way."""
    from datasets import Dataset

    return Dataset.from_dict({k: _column(rows, k) for k in rows[0]} if rows else {})


def from_dataset(ds: Dataset) -> list[dict[str, Any]]:
    rows = ds.to_list()
    for r in rows:
        for c in JSON_COLUMNS:
            if isinstance(r.get(c), str):
                r[c] = loads(r[c])
    return rows


def write_stage(stage_dir: Path, rows: list[dict[str, Any]], jsonl_name: str,
                extra: dict[str, Any] | None = None, allow_empty: bool = False) -> Dataset:
    """Replace `stage_dir` in one rename with {dataset/, jsonl_name, extra files}. No rows is an
    error unless `allow_empty`: an empty stage never replaces a good output."""
    if not rows and not allow_empty:
        raise ConfigError(f"{stage_dir}: the stage produced no rows; the previous output (if "
                          "any) is kept")
    ds = to_dataset(rows)
    with atomic_path(stage_dir) as tmp:
        tmp.mkdir(parents=True)
        with writing(tmp / "dataset"):
            ds.save_to_disk(str(tmp / "dataset"))
        write_jsonl(tmp / jsonl_name, rows)
        for name, content in (extra or {}).items():
            text = (content if isinstance(content, str)
                    else json.dumps(content, indent=2, default=str) + "\n")
            with writing(tmp / name):
                (tmp / name).write_text(text)
    return ds


# The stage that writes a directory, where it is not the directory's name.
_WRITTEN_BY = {"sft": "filter"}


def read_stage_rows(stage_dir: Path, jsonl_name: str) -> list[dict[str, Any]]:
    """The jsonl is the canonical, human-editable copy; the dataset is the fast one.

    A line that does not parse (a file cut short) is `DamagedState`, naming the file, the line
    and the stage command that rebuilds it."""
    if (stage_dir / jsonl_name).exists():
        try:
            return read_jsonl(stage_dir / jsonl_name)
        except ConfigError as err:
            stage = _WRITTEN_BY.get(stage_dir.name, stage_dir.name)
            raise DamagedState(
                f"{err}; rebuild it with `distill {stage} PIPELINE --run-dir "
                f"{stage_dir.parent}`: the teacher answers come back from the cache, not paid "
                "again"
            ) from None
    from datasets import load_from_disk

    return from_dataset(load_from_disk(str(stage_dir / "dataset")))

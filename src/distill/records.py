"""Row schemas and the run-directory layout (DESIGN.md "Contracts"). Extend fields, never rename.

A generation row is built in one place, `make_generation_row`, to the `GenerationRow` schema: the
chain-of-thought, adaptive and instruct generators and imported generation files all fill the
same fields the same way (a failed sample has no response; soft targets travel with every row
whose completion has them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import orjson

from distill.damage import DamagedState, disk_full

if TYPE_CHECKING:
    from distill.teachers.base import Completion, TopLogprobs

SEED_FIELDS = ("id", "question", "answer", "source")

GENERATION_FIELDS = (
    "id", "seed_id", "sample", "question", "gold", "messages", "response", "reasoning",
    "rationale", "answer", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd",
    "latency_s", "teacher", "teacher_served", "error", "error_kind",
)
"""Every generation row has these columns, in this order (a dataset takes its columns from the
first row): the required keys of `GenerationRow`."""

FILTERED_EXTRA_FIELDS = ("keep", "drop_reason", "scores", "cluster_id")


class _GenerationColumns(TypedDict):
    """The columns every generation row has (`GENERATION_FIELDS`)."""

    id: str
    """`{seed_id}#{sample}` unless an imported file names it."""
    seed_id: str
    sample: int
    question: str
    gold: str | None
    messages: list[dict[str, str]]
    """What the student is prompted with (system prompt and user turn)."""
    response: str | None
    """The teacher's text; None when the sample failed."""
    reasoning: str | None
    rationale: str | None
    answer: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_s: float
    teacher: str
    """`backend:model` as configured (`file:NAME` for imported rows)."""
    teacher_served: str | None
    """The model the server says answered, when it says."""
    error: str | None
    error_kind: str | None
    """`teachers.base.ErrorKind` of `error`."""


class GenerationRow(_GenerationColumns, total=False):
    """One teacher sample (or one imported row) of the generate stage: the columns, and what
    some generators add. (Two classes rather than `NotRequired`: with postponed annotations
    Python 3.11 cannot tell the optional keys apart at run time.)"""

    top_logprobs: TopLogprobs
    """Soft targets (`teacher.top_logprobs`), when the teacher returned them."""
    token_ids: list[int] | None
    extra: dict[str, Any]
    """Structured responses: {"parsed": the validated JSON value}."""
    adaptive_round: int
    """Adaptive sampling: the round that drew the sample, and how many the seed got."""
    seed_samples: int
    teacher_prompt: str
    """Instruct: the prompt the teacher answered, and where the instruction came from."""
    proposal_round: int
    evolve_round: int
    evolve_method: str | None
    parent_instruction: str | None


def empty_generation() -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(GENERATION_FIELDS)
    row.update(prompt_tokens=0, completion_tokens=0, cost_usd=0.0, latency_s=0.0, messages=[])
    return row


def make_generation_row(*, seed_id: str, sample: int, question: str, gold: str | None,
                        messages: list[dict[str, str]], teacher: str,
                        completion: Completion | None = None,
                        parsed: Mapping[str, str | None] | None = None,
                        price_in: float = 0.0, price_out: float = 0.0,
                        row_id: str | None = None, **fields: Any) -> GenerationRow:
    """The generation row of one sample: every generator builds its rows here.

    `completion`: the teacher's answer; it fills response, finish_reason, tokens, cost (at
    `price_in` / `price_out` per million tokens), latency, error and its kind, the served model,
    and the soft targets (`top_logprobs`, `token_ids`) when it carries them. A failed sample
    keeps no response and no `parsed` fields. `parsed`: reasoning / rationale / answer read
    from the response. `fields`: anything else the row carries (they override the above);
    without a completion they are the row's own values (an imported file's).
    """
    row = empty_generation()
    if completion is not None:
        from distill.teachers.base import completion_cost

        failed = bool(completion.error)
        row.update(response=None if failed else completion.text,
                   finish_reason=completion.finish_reason,
                   prompt_tokens=completion.prompt_tokens,
                   completion_tokens=completion.completion_tokens,
                   cost_usd=completion_cost(completion, price_in, price_out),
                   latency_s=round(completion.latency_s, 4),
                   teacher_served=completion.extra.get("served_model"),
                   error=completion.error, error_kind=completion.error_kind)
        if completion.top_logprobs is not None:
            row.update(top_logprobs=completion.top_logprobs, token_ids=completion.token_ids)
        if failed:
            parsed = None
    if parsed is not None:
        row.update(reasoning=parsed.get("reasoning"), rationale=parsed.get("rationale"),
                   answer=parsed.get("answer"))
    row.update(fields)
    row.update(id=row_id or f"{seed_id}#{sample}", seed_id=seed_id, sample=sample,
               question=question, gold=gold, messages=messages, teacher=teacher)
    return cast(GenerationRow, row)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able values (configs, file hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dir_signature(path: Path) -> str:
    """Cheap signature of a model directory: names, sizes and mtimes (no hashing of GBs)."""
    if not path.exists():
        return "missing"
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """Hash of a file or of a directory's files (names and contents)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success move it over `target` in one rename.

    A crash mid-write leaves the earlier good file (or directory) untouched, and a full disk
    too: it raises `DiskFull` naming the file (the temporary one by where it was going), and
    removes what it wrote.
    """
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
        yield tmp
        if target.is_dir() and tmp.is_dir():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old, target)  # the good one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp, target)
    except OSError as err:
        full = disk_full(err, target, tmp)
        if full is None:
            raise
        raise full from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


_ORJSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def dumps_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON. orjson, not json: rows carrying KD soft targets (top-k logprobs for
    every token) are mostly floats, and encoding them dominated the filter stage (~10x faster)."""
    return orjson.dumps(obj, default=str, option=_ORJSON_OPTS)


def dumps(obj: Any) -> str:
    return dumps_bytes(obj).decode()


def loads(text: str | bytes) -> Any:
    return orjson.loads(text)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for row in rows:
            fh.write(dumps_bytes(row) + b"\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    from distill.config import ConfigError

    rows = []
    with open(path, "rb") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{i}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{i}: expected a JSON object per line")
            rows.append(row)
    return rows


@dataclass(frozen=True)
class RunDir:
    """The run directory: every stage reads and writes only here."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def cache(self) -> Path:
        return self.root / "cache.sqlite"

    def stage(self, name: str) -> Path:
        return self.root / name

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def manifest(self) -> dict[str, Any]:
        """The stages' records; `DamagedState` if the file is there but unreadable (it is not
        reset: the run would redo every stage without saying why)."""
        path = self.manifest_path
        if not path.exists():
            return {"stages": {}}
        try:
            m = json.loads(path.read_bytes())
        except ValueError as err:  # invalid JSON or UTF-8
            problem = f"invalid JSON ({err})"
        else:
            if isinstance(m, dict) and isinstance(m.get("stages"), dict):
                return m
            problem = 'not a run manifest (no "stages" object)'
        raise DamagedState(
            f"{path}: damaged, {problem}; move it aside (mv {path} {path}.bad) and rerun: every "
            f"stage runs again, its teacher answers read from {self.cache} (not paid again)")

    def update_manifest(self, stage: str, *, fresh: bool = False, **fields: Any
                        ) -> dict[str, Any]:
        """Merge `fields` into the stage's entry; `fresh` starts the entry over (a rerun must
        not keep the results of the previous run beside its own)."""
        m = self.manifest()
        if fresh:
            m["stages"][stage] = {}
        entry = m["stages"].setdefault(stage, {})
        entry.update(fields)
        write_json(self.manifest_path, m)
        return entry

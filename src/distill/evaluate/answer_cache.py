"""The local models' answers on the held-out set, cached as they come (issue #27).

The base student and every trained student answer through `evaluate/answers.sqlite`, a
`ResponseCache` written by the engine as each forward batch finishes: a killed evaluate resumes
at the batch it was in, and the rerun's batches are the ones the uninterrupted run would have
had (the missing items, in the same order), so greedy answers and metrics come out the same.

A key holds the model's *identity* where the teacher's holds its name: a trained student's
directory signature (file names, sizes and mtimes, as the pipeline fingerprints `student*/`),
and for the base student a hash of its weights as built and of its tokenizer. A student
retrained in the same directory has new files, hence new keys, and never meets its old answers.

Not the run's `cache.sqlite`: that one holds paid-for teacher answers, while these cost only
compute and belong to this run's weights. Nothing is pruned: a rerun with the same models reuses
every answer, a changed model's old rows are never read again (a few KB an answer); delete the
file to start over.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from distill.records import dir_signature
from distill.teachers.base import BatchItem, Completion, Job, Result

FILE = "answers.sqlite"
"""The cache's file name in the evaluate stage's folder."""


def trained_identity(root: Path, model_dir: Path) -> str:
    """A trained student: its directory (relative to the run) and that directory's signature."""
    name = model_dir.relative_to(root) if model_dir.is_relative_to(root) else model_dir
    return f"{name}@{dir_signature(model_dir)}"


def tokenizer_blob(tok: Any) -> str:
    """What decides how a tokenizer encodes and renders chats: its full serialization (a fast
    tokenizer), else its vocabulary; its chat template and special tokens."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(),
                                                                   sort_keys=True)
    return json.dumps({"tokenizer": body, "chat_template": getattr(tok, "chat_template", None),
                       "special": {k: str(v) for k, v in tok.special_tokens_map.items()}},
                      sort_keys=True)


def weights_hash(model: Any) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes): the model as built,
    fresh init or pretrained (~1 s a GB of weights)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return h.hexdigest()


def base_identity(model: Any, tok: Any) -> str:
    """The base student: what it is, not where it came from (a fresh init depends on the seed
    and the torch version, a hub id on the revision it resolves to)."""
    h = hashlib.sha256(weights_hash(model).encode())
    h.update(tokenizer_blob(tok).encode())
    return f"base_student@{h.hexdigest()[:16]}"


class Identified:
    """`teacher` under another model id (the cache keys' model part); everything else is the
    teacher's own."""

    def __init__(self, teacher: Any, model_id: str) -> None:
        self.inner = teacher
        self.backend: str = teacher.backend
        self.model_id = model_id

    def stream(self, jobs: Sequence[Job]) -> AsyncIterator[Result]:
        return self.inner.stream(jobs)

    def generate_batch(self, batch: Sequence[BatchItem]) -> list[Completion]:
        out: list[Completion] = self.inner.generate_batch(batch)
        return out

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:  # in_flight, cfg, ...: the teacher's
        return getattr(self.inner, name)

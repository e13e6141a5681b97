"""sqlite response cache: every completion is durable the moment it arrives.

Keyed by a hash of (backend, model, messages, params, sample index), so a rerun after a crash (even
kill -9) sends only what is missing, and a changed prompt or temperature never reuses old answers.
Secrets are never part of a key or a value.

Use it as a context manager (`with ResponseCache(path) as cache:`): the database is closed
however the block ends.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from distill.teachers.base import Completion, SamplingParams


def cache_key(backend: str, model: str, messages: list[dict[str, str]], params: SamplingParams,
              sample: int, response_format: dict[str, Any] | None = None) -> str:
    fields: dict[str, Any] = {"backend": backend, "model": model, "messages": messages,
                              "params": params.as_dict(), "sample": sample}
    if response_format is not None:  # absent otherwise: earlier caches keep their keys
        fields["response_format"] = response_format
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL,"
            " created REAL DEFAULT (unixepoch('subsec')))"
        )

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key=?", (key,)).fetchone()
        return Completion.from_json(json.loads(row[0])) if row else None

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        out: dict[str, Completion] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                q = f"SELECT key, value FROM responses WHERE key IN ({','.join('?' * len(chunk))})"
                for k, v in self._db.execute(q, chunk):
                    out[k] = Completion.from_json(json.loads(v))
        return out

    def put(self, key: str, completion: Completion) -> None:
        """Cache what the server delivered (and billed): successes, and responses dropped by
        policy (`error_kind` "dropped"). Transient errors are retried on the next run."""
        if completion.error and completion.error_kind != "dropped":
            return
        value: dict[str, Any] = completion.to_json()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)",
                (key, json.dumps(value, ensure_ascii=False)),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        """Close the database (again: a no-op)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

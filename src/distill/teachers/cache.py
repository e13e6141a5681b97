"""sqlite response cache: every completion is durable the moment it arrives.

Keyed by a hash of (backend, model, messages, params, sample index), so a rerun after a crash (even
kill -9) sends only what is missing, and a changed prompt or temperature never reuses old answers.
Secrets are never part of a key or a value.

Use it as a context manager (`with ResponseCache(path) as cache:`): the database is closed
however the block ends.

A damaged file is `DamagedState` naming it, never replaced by an empty cache (that would pay
the teacher again for every answer); a full disk is `DiskFull` (the answers stored so far stay).
"""

from __future__ import annotations

import errno
import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from distill.damage import DamagedState, DiskFull
from distill.teachers.base import Completion, SamplingParams


def cache_key(backend: str, model: str, messages: list[dict[str, str]], params: SamplingParams,
              sample: int, response_format: dict[str, Any] | None = None) -> str:
    fields: dict[str, Any] = {"backend": backend, "model": model, "messages": messages,
                              "params": params.as_dict(), "sample": sample}
    if response_format is not None:  # absent otherwise: earlier caches keep their keys
        fields["response_format"] = response_format
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


# sqlite's errors of a write that found no room (a full disk gives SQLITE_FULL; a quota or a
# file size limit, the others).
_NO_ROOM = ("SQLITE_FULL", "SQLITE_IOERR_WRITE", "SQLITE_IOERR_SHMSIZE", "SQLITE_IOERR_TRUNCATE")


def _damaged(path: Path, problem: str) -> DamagedState:
    return DamagedState(
        f"{path}: the response cache is damaged ({problem}); it is not replaced, as an empty "
        f"one asks again for every answer it held (a teacher's are paid again): put back a "
        f"good copy, or move it (and any {path.name}-wal) aside to start over")


@contextmanager
def _sqlite_errors(path: Path) -> Iterator[None]:
    """A damaged database as `DamagedState`, a write with no room as `DiskFull`, naming `path`."""
    try:
        yield
    except sqlite3.DatabaseError as err:
        name = getattr(err, "sqlite_errorname", "")
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            raise _damaged(path, str(err)) from err
        if name in _NO_ROOM:
            code = errno.ENOSPC if name == "SQLITE_FULL" else errno.EIO
            raise DiskFull(code, path, None if name == "SQLITE_FULL" else
                           f"{err} (a full disk, a quota or a file size limit?)") from err
        raise


class ResponseCache:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # An empty file holds no answers (a process killed as sqlite created it): a new cache.
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as fh:
                if not fh.read(16).startswith(b"SQLite format 3"):
                    raise _damaged(path, f"not an SQLite database, {path.stat().st_size} bytes")
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        with _sqlite_errors(path):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL,"
                " created REAL DEFAULT (unixepoch('subsec')))"
            )

    def get(self, key: str) -> Completion | None:
        with self._lock, _sqlite_errors(self.path):
            row = self._db.execute("SELECT value FROM responses WHERE key=?", (key,)).fetchone()
        return Completion.from_json(json.loads(row[0])) if row else None

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        out: dict[str, Completion] = {}
        with self._lock, _sqlite_errors(self.path):
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
        with self._lock, _sqlite_errors(self.path):
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)",
                (key, json.dumps(value, ensure_ascii=False)),
            )

    def __len__(self) -> int:
        with self._lock, _sqlite_errors(self.path):
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

"""A full disk and damaged run-directory state, as one line that names the file and what to do.

`DiskFull`: a write ran out of space (ENOSPC), quota (EDQUOT) or file size (EFBIG). The writers
(`records.atomic_path`, the response cache) raise it naming the file they were writing; the CLI
prints it and exits 1. What was there before is intact: files are replaced in one rename, the
cache in sqlite transactions.

`DamagedState`: a file of the run directory that cannot be read (the response cache, the
manifest, a stage's rows). It is never reset silently, which could pay the teacher again; the
CLI prints it and exits 2, like any input to fix.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distill.config import ConfigError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFull(OSError):
    """A write failed for lack of space; `path` is the file (or directory) being written."""

    def __init__(self, code: int, path: Path | str, reason: str | None = None) -> None:
        super().__init__(code, reason or os.strerror(code).lower(), str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return (f"{self.strerror} writing {self.path}: free space and rerun; earlier outputs "
                "are intact")


class DamagedState(ConfigError):
    """A run-directory file that cannot be read: the message names it and says what to do."""


def disk_full(err: BaseException, path: Path, tmp: Path | None = None) -> DiskFull | None:
    """`err` as a `DiskFull` naming the file (else `path`), or None when it is another error.
    A file under `tmp`, the temporary twin of `path`, is named by where it is going."""
    if isinstance(err, DiskFull):
        named, reason = err.path, err.strerror
    elif isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        named, reason = Path(err.filename) if isinstance(err.filename, str) else path, None
    else:
        return None
    if tmp is not None and named.is_relative_to(tmp):
        named = path / named.relative_to(tmp)
    elif named.parent == path.parent and named.name.startswith(f".{path.name}."):
        named = path  # the temporary directory `records.atomic_path` makes beside it
    return DiskFull(err.errno or errno.EIO, named, reason)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """A full disk inside the block as `DiskFull` naming `path` where the error names no file
    (a failed `write()` does not; a library writing a directory may not)."""
    try:
        yield
    except OSError as err:
        full = disk_full(err, path)
        if full is None:
            raise
        raise full from err

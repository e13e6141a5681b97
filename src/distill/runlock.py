"""One process per run directory: an advisory lock held for as long as a run writes there.

`distill run` and the stage commands take `RUN_DIR/.lock` before they write anything; a second
`distill` on the same directory exits 2 at once naming the holder (pid, host, command, since
when). The lock is `flock(2)` on that file, so the kernel releases it when its holder dies however
it dies (SIGKILL, OOM, power); the file itself stays behind, and the next run reads whom it
belonged to and says that it took it over. Read-only commands (`report`, `chat`, `view`) take no
lock. Under `accelerate launch` the main process (RANK 0) holds it for the job: the other ranks
run inside that job.

flock is per host: two machines writing one run directory over NFS are not stopped by it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rich.console import Console

from distill.config import ConfigError

LOCK_NAME = ".lock"

console = Console(stderr=True)


class RunLocked(ConfigError):
    """The run directory is in use by another live process (the CLI's exit 2)."""


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
            "since": datetime.now(UTC).isoformat(timespec="seconds")}


def _describe(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} "
            f"({info.get('command', '?')}) since {info.get('since', '?')}")


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"command": "unreadable lock file"}
    return data if isinstance(data, dict) else {}


def _secondary_rank() -> bool:
    """A non-main process of a distributed launch (torchrun / accelerate set RANK)."""
    return os.environ.get("RANK", "0") not in ("", "0")


class RunLock:
    """`with RunLock(run_root):` holds the directory's lock; raises `RunLocked` when another
    live process has it. Re-entrant within one process (the API may nest runs)."""

    _held: dict[Path, int] = {}

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> None:
        key = self.root.resolve()
        if _secondary_rank() or key in RunLock._held:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise RunLocked(f"{self.root}: in use by {_describe(info)}; wait for it to finish "
                            "or stop it, then rerun (finished work is kept)") from None
        previous = _read(fd)
        if previous.get("pid") is not None:
            # Its holder is gone (the kernel released its flock) without releasing it itself.
            self.took_over = previous
            console.print(f"[yellow]note:[/yellow] {self.root}: took over the lock left by "
                          f"{_describe(previous)}, which is no longer running", highlight=False)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_holder()).encode())
        os.fsync(fd)
        self.fd = fd
        RunLock._held[key] = fd

    def release(self) -> None:
        if self.fd is None:
            return
        RunLock._held.pop(self.root.resolve(), None)
        try:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no holder to take over
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def holder(root: Path) -> dict[str, Any] | None:
    """Who holds `root`'s lock now (None when nobody does): for read-only commands to mention."""
    path = Path(root) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)

"""One chatd per data directory: the lock ``chatd serve`` holds while it owns the embedded servers.

Two chatds starting embedded servers in one data directory would fight over
the same cluster. The lock (``flock`` on ``chatd.lock``, released by the
kernel however chatd ends) says whether another chatd is alive; when it can
be taken, any server still running from the directory is a previous chatd's
leftover, and the servers stop it before starting their own.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from chatd.errors import ServiceStartError


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "chatd.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ServiceStartError(
                f"another chatd (pid {holder}) is serving from {self.path.parent}: stop it "
                "first, or give this one its own [embedded].data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

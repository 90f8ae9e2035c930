"""One server per data directory: an exclusive lock on `<data-dir>/server.lock`, taken before
the job store opens. Two servers on one directory would both resume the same jobs; the second
refuses to start and names the first (from what the first wrote into the lock file). The lock
goes with the process however it ends (the kernel drops a flock with its last descriptor)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path


class DataDirBusy(RuntimeError):
    pass


class DataDirLock:
    NAME = "server.lock"

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / self.NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            raise DataDirBusy(
                f"data directory {data_dir} is in use by another longscribe server ({holder}); "
                "stop it, or give this one its own --data-dir") from None
        self.record()

    def _holder(self) -> str:
        try:
            info = json.loads(os.pread(self._fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "details unknown"
        where = f" listening on {info['address']}" if info.get("address") else ""
        return f"pid {info.get('pid')}{where}, since {info.get('started', '?')}"

    def record(self, address: str = "") -> None:
        """Write who holds the lock (the address once the port is bound)."""
        info = {"pid": os.getpid(), "address": address,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

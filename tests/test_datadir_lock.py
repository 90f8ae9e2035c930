"""One server per --data-dir: a second server on the same directory refuses to start and names
the first; the first goes on serving; once it stops (or dies), the directory is free."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.conftest import ServerProcess


def test_second_server_on_one_data_dir_refuses(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data).start(timeout=300)
    try:
        second = ServerProcess(data).start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(timeout=60) == 1
        log = second.log()
        assert f"in use by another longscribe server (pid {first.pid} listening on " \
               f"{first.target}" in log, log
        first.wait_serving(timeout=10)  # untouched
    finally:
        first.stop()
    # a stopped server frees the directory; so does a killed one (the kernel drops the lock)
    third = ServerProcess(data).start(timeout=300)
    third.stop(sig=signal.SIGKILL)
    ServerProcess(data).start(timeout=300).stop()

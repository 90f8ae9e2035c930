"""The server's memory allocator: jemalloc preloaded by re-executing the same process when it is
installed (CI installs it), glibc malloc when asked for `--allocator system`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import ServerProcess
from longscribe.service import memory


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _wait_for_log(proc: ServerProcess, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = proc.log()
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the server log:\n{proc.log()[-2000:]}")


def test_server_preloads_jemalloc_in_the_same_process(server: ServerProcess) -> None:
    if memory.find_jemalloc() is None:
        pytest.skip("libjemalloc is not installed (make deps installs libjemalloc2)")
    # the pid the test started is the re-executed server: exec kept it, and it is serving
    assert "libjemalloc" in _maps(server.pid)
    assert "memory allocator: jemalloc" in server.log()


def test_allocator_system_keeps_glibc_malloc(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", "--allocator", "system").start(wait=False)
    try:
        _wait_for_log(proc, "memory allocator: system malloc")
        assert "libjemalloc" not in _maps(proc.pid)
    finally:
        proc.stop()


def test_unknown_allocator_is_a_usage_error(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", "--allocator", "tcmalloc").start(wait=False)
    deadline = time.monotonic() + 60
    while proc.proc is not None and proc.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.proc is not None and proc.proc.returncode not in (None, 0)
    assert proc.proc.returncode == 2  # argparse: a usage error
    assert "argument --allocator: invalid choice: 'tcmalloc'" in proc.log()

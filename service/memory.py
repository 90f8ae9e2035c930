"""Keep the server's resident memory flat across long and many jobs (glibc malloc tuning).

Big, short-lived allocations (decoded audio, mel batches, encoder outputs) made from many
threads spread over glibc's per-thread arenas and stay resident after they are freed, so RSS
creeps up with job count and length. Fewer arenas and a trim after each job hand that memory
back. Both are no-ops where the C library is not glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # mallopt parameter number in glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def limit_arenas(count: int = 2) -> bool:
    """Call before starting threads; True when glibc took the setting."""
    return bool(_LIBC and _LIBC.mallopt(_M_ARENA_MAX, count))


def release_free_memory() -> None:
    """Return freed heap pages to the operating system (after a job ends)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)

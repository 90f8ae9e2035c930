"""Keep the server's resident memory flat across long and many jobs (glibc malloc tuning).

Big, short-lived allocations (decoded audio, mel batches, encoder outputs) made from many
threads spread over glibc's per-thread arenas and stay resident after they are freed, so RSS
creeps up with job count and length. Fewer arenas, a fixed mmap threshold and a trim after
each job hand that memory back. All are no-ops where the C library is not glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # mallopt parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3
# Blocks from 4 MiB up (encoder activations, cross-attention keys and values) get their own
# mapping, handed back on free; a fixed threshold also stops glibc raising it as such blocks
# are freed, which is what let them pile up in a fragmented heap on long jobs. Smaller
# blocks stay in the heap and are reused: at 1 MiB the encoder's 1-4 MB activations were
# mapped and zeroed afresh for every window (~15 % slower; 10 min of speech, 2 cores).
MMAP_THRESHOLD = 4 << 20


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


def tune_malloc(arenas: int = 2) -> bool:
    """Call before starting threads; True when glibc took the settings."""
    return bool(_LIBC and _LIBC.mallopt(_M_ARENA_MAX, arenas)
                and _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_free_memory() -> None:
    """Return freed heap pages to the operating system (after a job ends)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)

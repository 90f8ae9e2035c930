"""Keep the server's resident memory flat across long and many jobs.

The engine allocates and frees hundreds of MB per batch (mel batches, encoder activations,
cross-attention state, decode scratch). Under glibc's malloc the heap fragments and the
resident peak rises batch after batch for the first minutes of a process, then levels off, so
a long job peaks higher than a short one. jemalloc, where installed, is preloaded by
re-executing the server (same pid) before it starts any thread: it grew less over a 3-hour job
and ran it faster (`make bench` reports the allocator and both peaks). Without jemalloc,
glibc is tuned instead: fewer arenas, a fixed mmap threshold, and a trim after each batch and
job. The glibc calls are no-ops under another C library or allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from pathlib import Path

from .config import ALLOCATORS

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # mallopt parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3
# Blocks from 4 MiB up (encoder activations, cross-attention keys and values) get their own
# mapping, handed back on free; a fixed threshold also stops glibc raising it as such blocks
# are freed, which is what let them pile up in a fragmented heap on long jobs. Smaller
# blocks stay in the heap and are reused: a lower threshold maps and zeroes the encoder's
# 1-4 MB activations afresh for every window.
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
    """Call before starting threads; True when glibc took the settings (never under jemalloc,
    whose mallopt-free design needs none of them)."""
    if jemalloc_active():
        return False
    return bool(_LIBC and _LIBC.mallopt(_M_ARENA_MAX, arenas)
                and _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_free_memory() -> None:
    """Return glibc's freed heap pages to the operating system (after a batch or a job)."""
    if _LIBC is not None and not jemalloc_active():
        _LIBC.malloc_trim(0)


# set only on the re-executed process: the LD_PRELOAD it had before, restored at once so that
# children (ffmpeg, yt-dlp) do not inherit the preload
_ORIGINAL_PRELOAD = "LONGSCRIBE_ORIGINAL_LD_PRELOAD"


def find_jemalloc() -> str | None:
    """The jemalloc shared library's name as the dynamic loader finds it, or None."""
    return ctypes.util.find_library("jemalloc")


def jemalloc_loaded(pid: int | str = "self") -> bool:
    """Whether a process (this one by default) has jemalloc mapped."""
    try:
        return "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@functools.cache
def jemalloc_active() -> bool:
    return jemalloc_loaded()


def use_allocator(choice: str) -> None:
    """Re-execute this process with jemalloc preloaded when `choice` asks for it (auto: when
    installed). Call first thing in serve(): exec keeps the pid, and no thread exists yet
    (env values are not checked by argparse, hence the check here). Raises SystemExit when
    jemalloc is required and missing."""
    if choice not in ALLOCATORS:
        raise SystemExit(f"--allocator must be one of {', '.join(ALLOCATORS)}, not {choice!r}")
    original = os.environ.pop(_ORIGINAL_PRELOAD, None)
    if original is not None:  # the re-executed process (never exec twice)
        if original:
            os.environ["LD_PRELOAD"] = original
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    if choice == "system" or jemalloc_active():
        return
    lib = find_jemalloc()
    if lib is None:
        if choice == "jemalloc":
            raise SystemExit("--allocator jemalloc: libjemalloc is not installed "
                             "(Debian/Ubuntu: apt-get install libjemalloc2)")
        return
    before = os.environ.get("LD_PRELOAD", "")
    env = dict(os.environ, LD_PRELOAD=f"{lib} {before}".strip(), **{_ORIGINAL_PRELOAD: before})
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def allocator_name() -> str:
    return "jemalloc" if jemalloc_active() else "system malloc"

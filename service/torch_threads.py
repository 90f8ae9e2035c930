"""Who runs torch on how many CPU threads.

torch's CPU ops run on an OpenMP thread pool, one pool per thread that has run a parallel op,
kept until that thread exits. GNU OpenMP cuts its spin-waiting short as soon as more pool
threads exist than CPUs, so an idle pool of another live thread (a job's feeder that ran the
VAD, the main thread that loaded the model) makes every parallel op of the engine's worker wake
its pool through the kernel: small ops cost several times more, and a decode step is made of
small ops. So the engine's worker is the one thread that runs torch on several threads; every
other thread runs its (small) torch work on one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# torch's own default (physical cores, or OMP_NUM_THREADS), read before anything changes it
DEFAULT_THREADS = torch.get_num_threads()


def use_engine_threads(threads: int | None) -> None:
    """On the engine's worker: its ops on `threads` threads (default: torch's)."""
    torch.set_num_threads(threads or DEFAULT_THREADS)


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch work of any other thread: on this thread alone, so it starts no pool. The count
    is per thread; it is put back afterwards, so the caller's own later work is unchanged."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

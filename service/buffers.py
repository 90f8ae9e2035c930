"""A bounded pool of reusable float32 sample buffers for decoded audio chunks.

Decoding hours of audio into fresh arrays per chunk churns the allocator; the pool hands the
same few arrays out again instead, and its bound caps how many chunk buffers exist at once
(which, with a bounded queue, is what keeps memory flat for long media).

Ownership rule: a buffer is lent to whoever acquired it (in practice the `AudioChunk` whose
`samples` view it backs). The pool reuses a buffer only when *nothing* outside the pool refers
to it any more, checked with the CPython reference count of the array (views keep their base
array alive, so a slice of `chunk.samples` kept by a consumer also counts). So a consumer that
holds a chunk, or any view of its samples, can never see them overwritten. `chunk.release()`
(or `pool.release(buf)`) drops the holder's reference early and wakes a waiting producer; a
chunk that is simply dropped and garbage-collected frees its buffer too. Copy the samples
(`np.array(view)`) if you need them beyond the chunk's life without pinning a pool buffer.
"""

from __future__ import annotations

import sys
import threading
import time

import grpc
import numpy as np

from .errors import JobError

# How often a waiting acquire re-scans for buffers freed by garbage collection (no notify then).
_POLL_SECONDS = 0.05


class PoolExhausted(JobError):
    """Every buffer is lent out and none came back in time."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


class BufferPool:
    """At most `max_buffers` float32 arrays of `buffer_samples` samples each, reused.

    `acquire(timeout=None)` returns a free buffer, allocating a new one while fewer than
    `max_buffers` exist; when all are lent it waits (forever with `timeout=None`, else up to
    `timeout` seconds) and then raises `PoolExhausted`; `block=False` raises at once.
    """

    def __init__(self, buffer_samples: int, max_buffers: int, dtype: np.dtype | type = np.float32):
        if buffer_samples <= 0 or max_buffers <= 0:
            raise ValueError("buffer_samples and max_buffers must be positive")
        self.buffer_samples = int(buffer_samples)
        self.max_buffers = int(max_buffers)
        self.dtype = np.dtype(dtype)
        self._buffers: list[np.ndarray] = []
        self._cond = threading.Condition()
        self._free_refs: int | None = None  # refcount of a buffer only the pool holds
        self.allocations = 0  # arrays ever created (stays <= max_buffers)
        self.reuses = 0  # acquires served by an existing array

    @property
    def nbytes_per_buffer(self) -> int:
        return self.buffer_samples * self.dtype.itemsize

    def _refs(self, i: int) -> int:
        # The same expression is used to calibrate and to test, so the interpreter's own
        # temporary references cancel out whatever the Python version.
        return sys.getrefcount(self._buffers[i])

    def _find_free(self) -> np.ndarray | None:
        for i in range(len(self._buffers)):
            if self._refs(i) <= self._free_refs:  # type: ignore[operator]
                self.reuses += 1
                return self._buffers[i]
        if len(self._buffers) < self.max_buffers:
            self._buffers.append(np.empty(self.buffer_samples, dtype=self.dtype))
            if self._free_refs is None:
                self._free_refs = self._refs(len(self._buffers) - 1)
            self.allocations += 1
            return self._buffers[-1]
        return None

    def acquire(self, block: bool = True, timeout: float | None = None) -> np.ndarray:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                buf = self._find_free()
                if buf is not None:
                    return buf
                if not block:
                    break
                wait = _POLL_SECONDS
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = min(wait, left)
                self._cond.wait(wait)
        raise PoolExhausted(
            f"all {self.max_buffers} audio buffers are in use: the consumer is not releasing "
            "chunks (call chunk.release() or drop them)"
        )

    def release(self, buf: np.ndarray | None = None) -> None:
        """Wake waiting acquirers; the caller must drop its own references to `buf` first or
        right after (the buffer is reused only once nothing else refers to it)."""
        del buf
        with self._cond:
            self._cond.notify_all()

    def in_use(self) -> int:
        """Buffers currently referenced outside the pool."""
        with self._cond:
            if self._free_refs is None:
                return 0
            return sum(1 for i in range(len(self._buffers)) if self._refs(i) > self._free_refs)

    def __len__(self) -> int:
        return len(self._buffers)

"""BufferPool: the bound, reuse, and the rule that held buffers are never handed out again."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from longscribe.service.audio import AudioChunk
from longscribe.service.buffers import BufferPool, PoolExhausted


def test_bound_and_exhaustion() -> None:
    pool = BufferPool(buffer_samples=1000, max_buffers=2)
    a = pool.acquire()
    b = pool.acquire()
    assert a is not b and a.shape == (1000,) and a.dtype == np.float32
    assert len(pool) == 2 and pool.in_use() == 2
    with pytest.raises(PoolExhausted) as info:
        pool.acquire(block=False)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    started = time.monotonic()
    with pytest.raises(PoolExhausted):
        pool.acquire(timeout=0.2)
    assert 0.18 <= time.monotonic() - started < 2.0
    assert pool.allocations == 2


def test_dropped_buffers_are_reused() -> None:
    pool = BufferPool(buffer_samples=1000, max_buffers=4)
    first = pool.acquire()
    first_id = id(first)
    del first
    for _ in range(10):
        again = pool.acquire()
        assert id(again) == first_id
        del again
    assert pool.allocations == 1 and pool.reuses == 10 and pool.in_use() == 0


def test_a_live_view_pins_its_buffer() -> None:
    pool = BufferPool(buffer_samples=100, max_buffers=2)
    buf = pool.acquire()
    buf[:] = 7.0
    view = buf[10:20]
    del buf
    other = pool.acquire()
    other[:] = -1.0  # must not land in the buffer the view still sees
    assert np.all(view == 7.0)
    assert pool.in_use() == 2
    with pytest.raises(PoolExhausted):
        pool.acquire(block=False)
    del view
    assert pool.in_use() == 1
    pool.acquire(block=False)


def test_chunk_release_wakes_a_blocked_acquire() -> None:
    pool = BufferPool(buffer_samples=1600, max_buffers=1)
    buf = pool.acquire()
    chunk = AudioChunk(0, 0, buf[:1600], _pool=pool)
    del buf
    got: list[np.ndarray] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5.0)))
    waiter.start()
    time.sleep(0.1)
    assert not got  # still blocked: the chunk holds the only buffer
    chunk.release()
    waiter.join(timeout=5.0)
    assert len(got) == 1 and chunk.num_samples == 0
    assert pool.allocations == 1


def test_chunk_as_context_manager_releases() -> None:
    pool = BufferPool(buffer_samples=10, max_buffers=1)
    buf = pool.acquire()
    with AudioChunk(0, 0, buf, _pool=pool) as chunk:
        del buf
        assert chunk.num_samples == 10
        with pytest.raises(PoolExhausted):
            pool.acquire(block=False)
    pool.acquire(block=False)


def test_concurrent_users_never_share_a_buffer() -> None:
    pool = BufferPool(buffer_samples=256, max_buffers=3)
    errors: list[str] = []

    def worker(tag: float) -> None:
        for _ in range(200):
            buf = pool.acquire(timeout=10.0)
            buf[:] = tag
            time.sleep(0)
            if not np.all(buf == tag):
                errors.append(f"buffer overwritten while held by {tag}")
            del buf

    threads = [threading.Thread(target=worker, args=(float(i),)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert pool.allocations <= 3

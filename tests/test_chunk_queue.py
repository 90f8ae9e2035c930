"""AudioChunkQueue: policies, bounds, timestamps, stale/flush/close, concurrency."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from longscribe.service.audio import AudioChunk
from longscribe.service.chunk_queue import (
    AudioChunkQueue,
    OverflowPolicy,
    QueueClosed,
    QueueEmpty,
)
from longscribe.service.metrics import Metrics, QueueMetricsObserver


def dropped(metrics: Metrics, queue: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "longscribe_chunks_dropped_total", {"queue": queue, "reason": reason})
    return value or 0.0


def test_many_producers_and_consumers_lose_and_duplicate_nothing() -> None:
    producers, per_producer, consumers = 6, 400, 4
    q: AudioChunkQueue[tuple[int, int]] = AudioChunkQueue(5, OverflowPolicy.BLOCK, name="mpmc")
    received: list[list[tuple[int, int]]] = [[] for _ in range(consumers)]

    def produce(pid: int) -> None:
        for seq in range(per_producer):
            assert q.put((pid, seq))

    def consume(cid: int) -> None:
        while True:
            try:
                received[cid].append(q.get())
            except QueueClosed:
                return

    cthreads = [threading.Thread(target=consume, args=(c,)) for c in range(consumers)]
    pthreads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in cthreads + pthreads:
        t.start()
    for t in pthreads:
        t.join(timeout=30)
    q.close()
    for t in cthreads:
        t.join(timeout=30)
    everything = [item for part in received for item in part]
    assert len(everything) == producers * per_producer
    assert set(everything) == {(p, s) for p in range(producers) for s in range(per_producer)}
    # FIFO: every consumer sees each producer's items in the order they were put.
    for part in received:
        for pid in range(producers):
            seqs = [s for p, s in part if p == pid]
            assert seqs == sorted(seqs)
    assert sum(1 for part in received if part) > 1  # the work really was shared
    assert q.put_count == q.get_count == producers * per_producer and len(q) == 0


def test_single_consumer_sees_each_producer_in_order() -> None:
    q: AudioChunkQueue[tuple[int, int]] = AudioChunkQueue(3)
    threads = [threading.Thread(target=lambda p=p: [q.put((p, s)) for s in range(300)])
               for p in range(4)]
    for t in threads:
        t.start()
    got = [q.get(timeout=10) for _ in range(1200)]
    for t in threads:
        t.join()
    for pid in range(4):
        assert [s for p, s in got if p == pid] == list(range(300))


def test_block_policy_waits_then_times_out_or_gets_room() -> None:
    q: AudioChunkQueue[int] = AudioChunkQueue(2, "block")
    assert q.put(1) and q.put(2)
    started = time.monotonic()
    assert q.put(3, timeout=0.2) is False
    assert 0.18 <= time.monotonic() - started < 2.0
    assert len(q) == 2

    threading.Timer(0.2, q.get).start()
    started = time.monotonic()
    assert q.put(3, timeout=5.0) is True  # a consumer made room
    assert 0.15 <= time.monotonic() - started < 2.0
    assert [q.get(), q.get()] == [2, 3]


def test_drop_oldest_evicts_and_counts() -> None:
    metrics = Metrics()
    q: AudioChunkQueue[int] = AudioChunkQueue(
        3, OverflowPolicy.DROP_OLDEST, name="live", observer=QueueMetricsObserver(metrics))
    for i in range(7):
        assert q.put(i) is True
    assert [q.get(), q.get(), q.get()] == [4, 5, 6]
    assert q.dropped == 4
    assert dropped(metrics, "live", "overflow") == 4


def test_reject_refuses_new_items_and_counts() -> None:
    metrics = Metrics()
    q: AudioChunkQueue[int] = AudioChunkQueue(
        3, OverflowPolicy.REJECT, name="rej", observer=QueueMetricsObserver(metrics))
    results = [q.put(i) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert [q.get(), q.get(), q.get()] == [0, 1, 2]
    assert q.rejected == 2
    assert dropped(metrics, "rej", "rejected") == 2


def test_byte_bound_with_chunks() -> None:
    def chunk(i: int, seconds: float) -> AudioChunk:
        return AudioChunk(i, i * 16000, np.zeros(int(seconds * 16000), dtype=np.float32))

    q: AudioChunkQueue[AudioChunk] = AudioChunkQueue(
        100, OverflowPolicy.DROP_OLDEST, max_bytes=3 * 64000)  # three 1 s chunks
    for i in range(5):
        q.put(chunk(i, 1.0))
    assert len(q) == 3 and q.nbytes == 3 * 64000
    q.put(chunk(5, 2.0))  # needs two slots' worth of bytes
    assert [c.index for c in (q.get(), q.get())] == [4, 5]
    # An item bigger than the whole budget still goes into an empty queue.
    q.put(chunk(6, 10.0))
    assert q.get().index == 6

    b: AudioChunkQueue[bytes] = AudioChunkQueue(10, "reject", max_bytes=10)
    assert b.put(b"12345") and b.put(b"12345") and not b.put(b"1")
    assert b.nbytes == 10


def test_chunks_are_timestamped_on_entry_and_exit() -> None:
    metrics = Metrics()
    q: AudioChunkQueue[AudioChunk] = AudioChunkQueue(
        4, name="ts", observer=QueueMetricsObserver(metrics))
    c = AudioChunk(0, 0, np.zeros(160, dtype=np.float32))
    before = time.monotonic()
    q.put(c)
    time.sleep(0.1)
    out = q.get()
    assert out is c
    assert c.enqueued_at is not None and c.dequeued_at is not None
    assert before <= c.enqueued_at and c.dequeued_at - c.enqueued_at >= 0.09
    total = metrics.registry.get_sample_value("longscribe_chunk_wait_seconds_sum", {"queue": "ts"})
    assert total is not None and total >= 0.09


def test_stale_items_are_collected() -> None:
    metrics = Metrics()
    q: AudioChunkQueue[str] = AudioChunkQueue(
        10, stale_after=0.3, name="stale", observer=QueueMetricsObserver(metrics))
    q.put("old-1")
    q.put("old-2")
    time.sleep(0.35)
    q.put("fresh")  # put collects the stale ones first
    assert len(q) == 1 and q.stale_dropped == 2
    assert q.get() == "fresh"
    q.put("x")
    assert q.collect_stale() == []
    time.sleep(0.35)
    assert q.collect_stale() == ["x"]
    assert dropped(metrics, "stale", "stale") == 3


def test_flush_reports_what_it_dropped(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    q: AudioChunkQueue[bytes] = AudioChunkQueue(
        10, name="fq", observer=QueueMetricsObserver(metrics))
    q.put(b"a" * 100)
    time.sleep(0.1)
    q.put(b"b" * 50)
    with caplog.at_level(logging.WARNING, logger="longscribe.service.chunk_queue"):
        report = q.flush()
    assert report.count == 2 and report.nbytes == 150
    assert report.oldest_age is not None and report.newest_age is not None
    assert report.oldest_age >= report.newest_age + 0.09
    assert len(q) == 0 and q.nbytes == 0
    assert any("flushed" in r.message and "2 items" in r.message for r in caplog.records)
    assert dropped(metrics, "fq", "flush") == 2
    empty = q.flush()
    assert (empty.count, empty.nbytes, empty.oldest_age) == (0, 0, None)


def test_flush_unblocks_a_waiting_producer() -> None:
    q: AudioChunkQueue[int] = AudioChunkQueue(1)
    q.put(0)
    threading.Timer(0.1, q.flush).start()
    assert q.put(1, timeout=5.0)
    assert q.get() == 1


def test_close_wakes_waiters_and_drains() -> None:
    q: AudioChunkQueue[int] = AudioChunkQueue(1)
    errors: list[BaseException] = []
    empty = AudioChunkQueue[int](1)
    waiter = threading.Thread(target=lambda: _expect_closed(empty.get, errors))
    waiter.start()
    time.sleep(0.05)
    empty.close()
    waiter.join(timeout=2)
    assert not waiter.is_alive()

    q.put(1)
    producer = threading.Thread(target=lambda: _expect_closed(lambda: q.put(2), errors))
    producer.start()
    time.sleep(0.05)
    q.close()
    producer.join(timeout=2)
    assert not producer.is_alive()
    assert len(errors) == 2
    assert q.get() == 1  # drains what is left
    with pytest.raises(QueueClosed):
        q.get()
    with pytest.raises(QueueClosed):
        q.put(3)


def _expect_closed(call: object, errors: list[BaseException]) -> None:
    try:
        call()  # type: ignore[operator]
    except QueueClosed as e:
        errors.append(e)


def test_get_timeout_and_peek() -> None:
    q: AudioChunkQueue[int] = AudioChunkQueue(3)
    assert q.peek() is None
    started = time.monotonic()
    with pytest.raises(QueueEmpty):
        q.get(timeout=0.1)
    assert time.monotonic() - started >= 0.09
    q.put(7)
    q.put(8)
    assert q.peek() == 7 and len(q) == 2
    assert q.get() == 7


def test_sustained_depth_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    q: AudioChunkQueue[int] = AudioChunkQueue(4, warn_fraction=0.5, warn_after=0.5, name="deep")
    with caplog.at_level(logging.WARNING, logger="longscribe.service.chunk_queue"):
        q.put(1)
        q.check_depth()
        assert q.warnings == 0  # below the threshold
        q.put(2)
        q.check_depth()
        assert q.warnings == 0  # above it, but not for long enough yet
        time.sleep(0.55)
        q.check_depth()
    assert q.warnings == 1
    assert any("deep" in r.message and "not keeping up" in r.message for r in caplog.records)
    q.get()
    q.check_depth()  # back below: the episode ends
    time.sleep(0.55)
    q.check_depth()
    assert q.warnings == 1


ops = st.lists(st.one_of(st.tuples(st.just("put"), st.integers(0, 8)), st.just(("get", 0))),
               max_size=60)


@settings(max_examples=150, deadline=None)
@given(policy=st.sampled_from(list(OverflowPolicy)), maxsize=st.integers(1, 5),
       max_bytes=st.one_of(st.none(), st.integers(1, 20)), script=ops)
def test_matches_a_simple_model(policy: OverflowPolicy, maxsize: int, max_bytes: int | None,
                                script: list[tuple[str, int]]) -> None:
    """Single-threaded, the queue behaves like a deque with the policy's overflow rule."""
    # Items are (serial, size) so equal sizes stay distinguishable.
    q: AudioChunkQueue[tuple[int, int]] = AudioChunkQueue(
        maxsize, policy, max_bytes=max_bytes, size_fn=lambda item: item[1])
    model: deque[tuple[int, int]] = deque()

    def used() -> int:
        return sum(size for _, size in model)

    def fits(item: tuple[int, int]) -> bool:
        return len(model) < maxsize and (
            max_bytes is None or not model or used() + item[1] <= max_bytes)

    for serial, (op, size) in enumerate(script):
        if op == "put":
            item = (serial, size)
            if policy is OverflowPolicy.DROP_OLDEST:
                while model and not fits(item):
                    model.popleft()
                expect = True
            else:
                expect = fits(item)
            assert q.put(item, timeout=0) is expect
            if expect:
                model.append(item)
        else:
            if model:
                assert q.get(timeout=0) == model.popleft()
            else:
                with pytest.raises(QueueEmpty):
                    q.get(timeout=0)
        assert len(q) == len(model)
        assert q.nbytes == used()
        assert len(q) <= maxsize

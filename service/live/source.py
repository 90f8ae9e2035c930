"""One live source: its bounded frame queue, its ring buffer of recent audio, its status.

The queue is service/chunk_queue.py's AudioChunkQueue with the session's overflow policy
(drop-oldest by default, reject, or block), bounded by audio bytes, with stale collection: a
frame that waited longer than `stale_after` is dropped (a live transcript that far behind is of
no use). What each put or get dropped is measured here (the queue reports counts, not audio
seconds). The ring buffer holds the last seconds of the source's audio: utterances are cut out
of it for every partial and final decode, so frames can be dropped once copied in.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..chunk_queue import AudioChunkQueue, OverflowPolicy, QueueClosed, QueueEmpty
from ..transcriber import SAMPLE_RATE

BYTES_PER_SAMPLE = 4  # frames are queued as float32


@dataclass
class Frame:
    start_sample: int  # in the source's timeline (samples received before it)
    samples: np.ndarray = field(repr=False)
    received_at: float = 0.0  # time.monotonic() when it arrived
    enqueued_at: float = 0.0  # set by the queue
    dequeued_at: float = 0.0

    @property
    def nbytes(self) -> int:
        return int(self.samples.nbytes)

    @property
    def end_sample(self) -> int:
        return self.start_sample + len(self.samples)


class RingBuffer:
    """The last `capacity` samples of a stream, addressed by absolute sample numbers. A write
    that does not continue the previous one (audio dropped in between) starts the buffer again
    at its own position."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data = np.zeros(capacity, dtype=np.float32)
        self.start = 0  # absolute sample of the oldest sample held
        self.end = 0  # absolute sample after the newest

    def write(self, at: int, samples: np.ndarray) -> None:
        if at != self.end:
            self.start = self.end = at
        n = len(samples)
        if n >= self.capacity:
            samples, at = samples[-self.capacity:], at + n - self.capacity
            self.start = at
            n = self.capacity
        pos = at % self.capacity
        first = min(n, self.capacity - pos)
        self._data[pos:pos + first] = samples[:first]
        self._data[:n - first] = samples[first:]
        self.end = at + n
        self.start = max(self.start, self.end - self.capacity)

    def read(self, start: int, end: int) -> np.ndarray:
        """A copy of samples [start, end), clipped to what the buffer holds."""
        start, end = max(start, self.start), min(end, self.end)
        if end <= start:
            return np.zeros(0, dtype=np.float32)
        idx = np.arange(start, end) % self.capacity
        return self._data[idx]


class SourceQueue:
    """A source's bounded queue plus the drop accounting and the status the client is sent."""

    def __init__(self, name: str, policy: str, max_seconds: float, stale_after: float | None
                 ) -> None:
        self.name = name
        self.policy = OverflowPolicy(policy)
        max_bytes = int(max_seconds * SAMPLE_RATE * BYTES_PER_SAMPLE)
        self.capacity_seconds = max_seconds
        # blocking clients are throttled instead, so nothing of theirs goes stale
        stale = None if self.policy is OverflowPolicy.BLOCK else stale_after
        # maxsize counts frames: enough for 10 ms frames filling the byte budget
        self.queue: AudioChunkQueue[Frame] = AudioChunkQueue(
            max(4, int(max_seconds * 100) + 1), self.policy, max_bytes=max_bytes,
            stale_after=stale, name=f"live:{name}", warn_after=10.0)
        self._lock = threading.Lock()  # put/get pairs with their byte accounting
        self.dropped_samples = 0
        self.dropped_frames = 0
        self._drops_since_check = 0

    def put(self, frame: Frame, timeout: float | None = None) -> bool:
        """Queue a frame; False when it was refused (reject policy). Raises QueueClosed."""
        if self.policy is OverflowPolicy.BLOCK:
            return self.queue.put(frame, timeout)  # waits for room; nothing is dropped
        with self._lock:
            before, count_before = self.queue.nbytes, len(self.queue)
            accepted = self.queue.put(frame)
            after, count_after = self.queue.nbytes, len(self.queue)
            if accepted:
                lost = before + frame.nbytes - after
                lost_frames = count_before + 1 - count_after
            else:
                lost, lost_frames = frame.nbytes + (before - after), 1 + count_before - count_after
            self._count(lost, lost_frames)
        return accepted

    def get(self) -> Frame | None:
        """The oldest frame, or None when there is none (never waits)."""
        with self._lock:
            before, count_before = self.queue.nbytes, len(self.queue)
            try:
                frame = self.queue.get(timeout=0)
            except (QueueEmpty, QueueClosed):
                frame = None
            after, count_after = self.queue.nbytes, len(self.queue)
            got, got_count = (frame.nbytes, 1) if frame is not None else (0, 0)
            self._count(before - after - got, count_before - count_after - got_count)
        return frame

    def _count(self, nbytes: int, frames: int) -> None:
        if frames > 0:
            self.dropped_samples += nbytes // BYTES_PER_SAMPLE
            self.dropped_frames += frames
            self._drops_since_check += frames

    def take_drops(self) -> int:
        """Frames dropped since the last call."""
        with self._lock:
            n, self._drops_since_check = self._drops_since_check, 0
            return n

    @property
    def depth(self) -> int:
        return len(self.queue)

    @property
    def queued_seconds(self) -> float:
        return self.queue.nbytes / BYTES_PER_SAMPLE / SAMPLE_RATE

    @property
    def dropped_seconds(self) -> float:
        return self.dropped_samples / SAMPLE_RATE

    def close(self) -> int:
        """Flush what is queued (counted as dropped) and refuse further frames."""
        with self._lock:
            report = self.queue.flush("source closed")
            self.queue.close()
            self._count(report.nbytes, report.count)
            return report.count


class ArrivalTimes:
    """When each recent frame's last sample arrived: the final-latency clock starts there."""

    def __init__(self, keep: int = 4096) -> None:
        self._ends: deque[tuple[int, float]] = deque(maxlen=keep)

    def add(self, end_sample: int, at: float) -> None:
        self._ends.append((end_sample, at))

    def when(self, sample: int) -> float | None:
        """Arrival time of the frame holding `sample` (the first frame ending after it)."""
        for end, at in self._ends:
            if end >= sample:
                return at
        return self._ends[-1][1] if self._ends else None


class StatusTracker:
    """ok / backpressure / dropping for one source: what the client is told and when. A change
    is sent at once; a non-ok state is repeated at most once a second while it lasts; the
    return to ok is sent once (the recovery event)."""

    def __init__(self, high_fraction: float = 0.5, low_fraction: float = 0.25,
                 drop_hold: float = 1.0, repeat: float = 1.0) -> None:
        self.high = high_fraction
        self.low = low_fraction
        self.drop_hold = drop_hold  # a drop keeps the state "dropping" this long
        self.repeat = repeat
        self.state = "ok"
        self.last_sent = 0.0
        self.last_drop = -1e9
        self.overflowing_since: float | None = None  # dropping continuously since

    def update(self, fill: float, dropped_now: int, now: float | None = None) -> str | None:
        """The state to send now, or None. `fill`: queue fullness 0..1."""
        now = time.monotonic() if now is None else now
        if dropped_now:
            self.last_drop = now
        if now - self.last_drop < self.drop_hold:
            state = "dropping"
        elif fill >= self.high or (self.state != "ok" and fill > self.low):
            state = "backpressure"
        else:
            state = "ok"
        if state == "dropping":
            if self.overflowing_since is None:
                self.overflowing_since = now
        else:
            self.overflowing_since = None
        changed = state != self.state
        self.state = state
        if changed or (state != "ok" and now - self.last_sent >= self.repeat):
            self.last_sent = now
            return state
        return None

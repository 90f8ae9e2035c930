"""`AudioChunkQueue`: the one bounded, thread-safe queue between decoding and the engine.

Bounded by item count and optionally by bytes (`item.nbytes`, `len(bytes)`, or `size_fn`).
What `put` does when it is full depends on the policy:

- `BLOCK` (batch jobs): the producer waits, which throttles ffmpeg and the download; with a
  timeout, `put` returns False when no room came.
- `DROP_OLDEST` (live audio): the oldest items are evicted to make room; each is counted.
- `REJECT` (live audio): the new item is refused (`put` returns False) and counted.

Every entry is timestamped (time.monotonic()) on entry and exit; items with `enqueued_at` /
`dequeued_at` attributes (AudioChunk) get them set. With `stale_after`, items older than that
are dropped by `collect_stale()`, which `put` and `get` also run. `flush()` is the emergency
exit: empties the queue, logs a warning and returns a `FlushReport`. `close()` wakes everyone;
`put` then raises `QueueClosed`, `get` drains what is left and then raises `QueueClosed`.
A warning is logged when the depth stays at or above `warn_fraction` of `maxsize` for longer
than `warn_after` seconds. An observer (`QueueObserver`, e.g. metrics.QueueMetricsObserver)
hears every put, get and drop. All waiting is plain loops on condition variables.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

QueueEmpty = queue.Empty  # raised by get(timeout=...) when nothing arrived in time


class QueueClosed(Exception):
    """The queue is closed (and, for `get`, drained)."""


class OverflowPolicy(enum.Enum):
    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    REJECT = "reject"


class QueueObserver(Protocol):
    """Hooks called (outside the queue's lock) after each operation, with the queue's state
    after it: `depth` items holding `nbytes` bytes."""

    def on_put(self, queue: str, depth: int, nbytes: int) -> None: ...

    def on_get(self, queue: str, depth: int, nbytes: int, wait_seconds: float) -> None: ...

    def on_drop(self, queue: str, depth: int, nbytes: int, reason: str, count: int) -> None: ...


@dataclass(frozen=True)
class FlushReport:
    count: int
    nbytes: int
    oldest_age: float | None  # seconds the oldest dropped item had waited
    newest_age: float | None


@dataclass
class _Entry:
    item: Any
    nbytes: int
    enqueued_at: float


def default_size(item: object) -> int:
    """Bytes of an item: `.nbytes` (numpy, AudioChunk), else `len()` of bytes-likes, else 0."""
    nbytes = getattr(item, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(item, (bytes, bytearray, memoryview)):
        return len(item)
    return 0


class AudioChunkQueue(Generic[T]):
    def __init__(
        self,
        maxsize: int,
        policy: OverflowPolicy | str = OverflowPolicy.BLOCK,
        *,
        max_bytes: int | None = None,
        stale_after: float | None = None,
        name: str = "",
        observer: QueueObserver | None = None,
        size_fn: Callable[[Any], int] = default_size,
        warn_fraction: float = 0.9,
        warn_after: float = 30.0,
    ) -> None:
        if maxsize <= 0:
            raise ValueError("maxsize must be positive")
        self.maxsize = maxsize
        self.policy = OverflowPolicy(policy)
        self.max_bytes = max_bytes
        self.stale_after = stale_after
        self.name = name or "chunks"
        self.observer = observer
        self.size_fn = size_fn
        self.warn_fraction = warn_fraction
        self.warn_after = warn_after
        self._items: deque[_Entry] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._high_since: float | None = None
        self._last_warning = 0.0
        # Totals since creation, for tests and status lines.
        self.put_count = 0
        self.get_count = 0
        self.dropped = 0  # evicted by DROP_OLDEST
        self.rejected = 0  # refused by REJECT
        self.stale_dropped = 0
        self.flushed = 0
        self.warnings = 0

    # -- state ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def closed(self) -> bool:
        return self._closed

    def _fits(self, nbytes: int) -> bool:
        if len(self._items) >= self.maxsize:
            return False
        # An item larger than the whole byte budget still goes into an empty queue, or a
        # BLOCK producer would wait forever.
        return self.max_bytes is None or not self._items or self._bytes + nbytes <= self.max_bytes

    # -- producer ------------------------------------------------------------------------------

    def put(self, item: T, timeout: float | None = None) -> bool:
        """Add `item`; True if it went in. See the module docstring for the policies."""
        nbytes = int(self.size_fn(item))
        drops: list[tuple[str, int]] = []
        with self._not_full:
            if self._closed:
                raise QueueClosed(f"queue {self.name} is closed")
            stale = self._collect_stale_locked()
            if stale:
                drops.append(("stale", len(stale)))
            if not self._fits(nbytes):
                if self.policy is OverflowPolicy.REJECT:
                    self.rejected += 1
                    drops.append(("rejected", 1))
                    accepted = False
                elif self.policy is OverflowPolicy.DROP_OLDEST:
                    evicted = 0
                    while self._items and not self._fits(nbytes):
                        self._pop_locked()
                        evicted += 1
                    self.dropped += evicted
                    drops.append(("overflow", evicted))
                    accepted = True
                else:
                    accepted = self._wait_for_room(nbytes, timeout)
            else:
                accepted = True
            if accepted:
                entry = _Entry(item, nbytes, time.monotonic())
                _stamp(item, "enqueued_at", entry.enqueued_at)
                self._items.append(entry)
                self._bytes += nbytes
                self.put_count += 1
                self._not_empty.notify()
                self._after_change()
            state = self._state()
        self._notify_drops(drops, state)
        if accepted and self.observer is not None:
            self.observer.on_put(self.name, *state)
        return accepted

    def _wait_for_room(self, nbytes: int, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._fits(nbytes):
            if self._closed:
                raise QueueClosed(f"queue {self.name} is closed")
            # Wake at least every second so a long stall still produces the depth warning.
            wait = 1.0
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = min(wait, left)
            self._not_full.wait(wait)
            self._after_change()
        return True

    # -- consumer ------------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> T:
        """Oldest item; waits up to `timeout` (forever if None) and raises `QueueEmpty` then.
        After `close()`, returns what is left and then raises `QueueClosed`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        drops: list[tuple[str, int]] = []
        failure: Exception | None = None
        entry: _Entry | None = None
        wait_seconds = 0.0
        with self._not_empty:
            while True:
                stale = self._collect_stale_locked()
                if stale:
                    drops.append(("stale", len(stale)))
                if self._items:
                    break
                if self._closed:
                    failure = QueueClosed(f"queue {self.name} is closed")
                    break
                wait = None
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        failure = QueueEmpty()
                        break
                self._not_empty.wait(wait)
            if failure is None:
                entry = self._pop_locked()
                now = time.monotonic()
                wait_seconds = now - entry.enqueued_at
                _stamp(entry.item, "dequeued_at", now)
                self.get_count += 1
                self._after_change()
            state = self._state()
        self._notify_drops(drops, state)
        if failure is not None:
            raise failure
        assert entry is not None
        if self.observer is not None:
            self.observer.on_get(self.name, state[0], state[1], wait_seconds)
        return entry.item

    def peek(self) -> T | None:
        """The oldest item without removing it (None when empty)."""
        with self._lock:
            return self._items[0].item if self._items else None

    # -- maintenance ---------------------------------------------------------------------------

    def collect_stale(self) -> list[T]:
        """Remove and return items that waited longer than `stale_after` seconds."""
        with self._lock:
            stale = self._collect_stale_locked()
            state = self._state()
        if stale:
            self._notify_drops([("stale", len(stale))], state)
        return stale

    def flush(self, reason: str = "flush") -> FlushReport:
        """Emergency: drop everything queued, log what was dropped, and return the report."""
        now = time.monotonic()
        with self._lock:
            entries = list(self._items)
            self._items.clear()
            self._bytes = 0
            self.flushed += len(entries)
            self._not_full.notify_all()
            self._after_change()
            state = self._state()
        report = FlushReport(
            count=len(entries),
            nbytes=sum(e.nbytes for e in entries),
            oldest_age=now - entries[0].enqueued_at if entries else None,
            newest_age=now - entries[-1].enqueued_at if entries else None,
        )
        if entries:
            log.warning(
                "queue %s flushed (%s): dropped %d items, %d bytes, oldest waited %.2f s",
                self.name, reason, report.count, report.nbytes, report.oldest_age,
            )
            self._notify_drops([(reason, len(entries))], state)
        return report

    def close(self) -> None:
        """No more puts; wake every waiter. Consumers drain what is left."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def check_depth(self) -> None:
        """Run the sustained-depth warning check now (puts and gets run it too)."""
        with self._lock:
            self._after_change()

    # -- internals (lock held) -----------------------------------------------------------------

    def _state(self) -> tuple[int, int]:
        return len(self._items), self._bytes

    def _pop_locked(self) -> _Entry:
        entry = self._items.popleft()
        self._bytes -= entry.nbytes
        self._not_full.notify()
        return entry

    def _collect_stale_locked(self) -> list[T]:
        if self.stale_after is None or not self._items:
            return []
        cutoff = time.monotonic() - self.stale_after
        stale: list[T] = []
        # Entries are in arrival order, so the stale ones are all at the front.
        while self._items and self._items[0].enqueued_at < cutoff:
            stale.append(self._pop_locked().item)
        self.stale_dropped += len(stale)
        return stale

    def _after_change(self) -> None:
        now = time.monotonic()
        if len(self._items) < self.warn_fraction * self.maxsize:
            self._high_since = None
            return
        if self._high_since is None:
            self._high_since = now
            return
        high_for = now - self._high_since
        if high_for >= self.warn_after and now - self._last_warning >= self.warn_after:
            self._last_warning = now
            self.warnings += 1
            log.warning(
                "queue %s has held %d/%d items (%d bytes) for %.1f s: the consumer is not "
                "keeping up", self.name, len(self._items), self.maxsize, self._bytes, high_for,
            )

    def _notify_drops(self, drops: list[tuple[str, int]], state: tuple[int, int]) -> None:
        if self.observer is None:
            return
        for reason, count in drops:
            if count:
                self.observer.on_drop(self.name, state[0], state[1], reason, count)


def _stamp(item: object, attribute: str, when: float) -> None:
    # Items that carry their own timestamps (AudioChunk) get them; others are left alone.
    if hasattr(item, attribute):
        with contextlib.suppress(AttributeError):
            setattr(item, attribute, when)

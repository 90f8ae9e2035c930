"""A circuit breaker for one remote, on an injectable clock.

closed: requests go out; `failure_threshold` failures in a row open it. open: nothing goes out
for `open_seconds` (doubling after each failed probe, up to `max_open_seconds`); then half-open:
one request is let through as a probe while the others wait. The probe's success closes the
circuit, its failure opens it again. Any success closes it (a request sent before it opened
came back fine: the remote is up). `down_for()` is how long the current run of failures has
lasted: callers give up past their own bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 5, open_seconds: float = 1.0,
                 max_open_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.base_open_seconds = open_seconds
        self.max_open_seconds = max(open_seconds, max_open_seconds)
        self.clock = clock
        self.on_change = on_change
        self.state = CLOSED
        self.failures = 0  # in a row
        self.opened = 0  # times it opened (for metrics)
        self.last_error = ""
        self._open_seconds = open_seconds
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if state == OPEN:
                self.opened += 1
            if self.on_change is not None:
                self.on_change(state)

    def allow(self) -> tuple[float, bool]:
        """(0, is_probe) when a request may go out now, else (seconds to wait, False). A caller
        given a probe must report it back: success(), failure() or release()."""
        with self._lock:
            if self.state == CLOSED:
                return 0.0, False
            now = self.clock()
            if self.state == OPEN:
                if now < self._retry_at:
                    return self._retry_at - now, False
                self._set(HALF_OPEN)
            if self._probing:
                return 0.1, False  # someone else's probe is out: ask again shortly
            self._probing = True
            return 0.0, True

    def success(self, probe: bool = False) -> None:
        with self._lock:
            if probe:
                self._probing = False
            self.failures = 0
            self._down_since = None
            self._open_seconds = self.base_open_seconds
            self._set(CLOSED)

    def failure(self, reason: str, probe: bool = False) -> None:
        with self._lock:
            now = self.clock()
            self.failures += 1
            self.last_error = reason
            if self._down_since is None:
                self._down_since = now
            if probe:
                self._probing = False
                self._open_seconds = min(self._open_seconds * 2, self.max_open_seconds)
                self._retry_at = now + self._open_seconds
                self._set(OPEN)
            elif self.state == CLOSED and self.failures >= self.failure_threshold:
                self._retry_at = now + self._open_seconds
                self._set(OPEN)

    def release(self, probe: bool) -> None:
        """A probe that ended without an answer (its job was cancelled): let another probe."""
        if probe:
            with self._lock:
                self._probing = False

    def down_for(self) -> float:
        """Seconds since the first of the failures in a row (0 when the last request worked)."""
        with self._lock:
            return 0.0 if self._down_since is None else self.clock() - self._down_since

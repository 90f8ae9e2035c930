"""A token bucket for requests per minute to a remote API, on an injectable clock.

The bucket holds `burst` tokens and refills at (per_minute - burst) tokens a minute, so no
window of 60 s ever sees more than `per_minute` requests, even one that starts with a full
bucket (a plain bucket refilled at per_minute would let burst + per_minute through). A remote's
`Retry-After` pauses the whole bucket: the limit is the API key's, not one request's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, per_minute: float, burst: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = float(per_minute)
        self.unlimited = per_minute <= 0
        if self.unlimited:
            self.capacity, self.rate = 1.0, 0.0
        elif per_minute >= 2:
            # at most half the minute's budget as a burst, so the refill keeps a real rate
            self.capacity = float(min(max(1, burst), max(1, int(per_minute // 2))))
            self.rate = (self.per_minute - self.capacity) / 60.0  # tokens per second
        else:  # under 2 a minute: one request every 60/per_minute s
            self.capacity, self.rate = 1.0, self.per_minute / 60.0
        self.clock = clock
        self._tokens = self.capacity
        self._stamp = clock()
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_take(self) -> float:
        """Take a token and return 0, or return the seconds until one may be there."""
        with self._lock:
            now = self.clock()
            if now < self._paused_until:
                return self._paused_until - now
            if self.unlimited:
                return 0.0
            self._refill(now)
            if self._tokens >= 1.0 - 1e-9:  # float dust must not leave a waiter spinning
                self._tokens = max(0.0, self._tokens - 1.0)
                return 0.0
            return (1.0 - self._tokens) / self.rate

    def pause_for(self, seconds: float) -> None:
        """No token for anyone for `seconds` (a 429's Retry-After)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self.clock() + max(0.0, seconds))

    def paused_for(self) -> float:
        with self._lock:
            return max(0.0, self._paused_until - self.clock())

    def acquire(self, should_stop: Callable[[], bool], poll: float = 0.2,
                sleep: Callable[[float], None] = time.sleep) -> float:
        """Block until a token is taken; returns the seconds waited, or -1 when `should_stop()`
        turned true first (checked every `poll` s, so a cancel is seen quickly)."""
        started = self.clock()
        waited = False
        while True:
            if should_stop():
                return -1.0
            wait = self.try_take()
            if wait <= 0:
                return self.clock() - started if waited else 0.0
            waited = True
            sleep(min(wait, poll))

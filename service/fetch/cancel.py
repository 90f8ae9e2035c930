"""The one stop signal of a download.

A download is stopped by its own `StopSignal`: `set()` by the handle's `cancel()`, or by the
caller's event (the job's cancel) it follows. Every check in the package reads this one event;
waits (retry backoff) wait on it; setting it runs the source's abort callback, so a read blocked
on a silent socket ends at once instead of at the socket timeout.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

# How long the follower thread may outlive its download: it waits on the caller's event (so a
# cancel is seen at once) and only looks at the download's end this often.
_FOLLOW_LINGER_SECONDS = 1.0


class StopSignal(threading.Event):
    """A threading.Event that is also set when `parent` is, and runs callbacks when set."""

    def __init__(self, parent: threading.Event | None = None) -> None:
        super().__init__()
        self.parent = parent
        self._callbacks: list[Callable[[], None]] = []
        self._callbacks_lock = threading.Lock()

    def is_set(self) -> bool:
        # the parent is read directly too, so no check waits for the follower thread to wake
        return super().is_set() or (self.parent is not None and self.parent.is_set())

    def wait(self, timeout: float | None = None) -> bool:
        if self.parent is not None and self.parent.is_set():
            return True
        return super().wait(timeout)

    def set(self) -> None:
        with self._callbacks_lock:
            first = not super().is_set()
            super().set()
            callbacks = list(self._callbacks) if first else []
        for callback in callbacks:
            with contextlib.suppress(Exception):  # an abort that fails must not hide the stop
                callback()

    def on_set(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the signal is set (now, if it already is)."""
        with self._callbacks_lock:
            self._callbacks.append(callback)
            already = super().is_set()
        if already:
            callback()
        elif self.parent is not None and self.parent.is_set():
            self.set()

    def follow_parent(self, until: threading.Event) -> threading.Thread | None:
        """Set this signal when the parent is set, until `until` is; one thread, which sleeps
        in the parent's wait. None when there is no parent to follow."""
        if self.parent is None:
            return None
        parent = self.parent

        def follow() -> None:
            while not parent.wait(_FOLLOW_LINGER_SECONDS):
                if until.is_set():
                    return
            if not until.is_set():
                self.set()

        thread = threading.Thread(target=follow, name="fetch-cancel", daemon=True)
        thread.start()
        return thread

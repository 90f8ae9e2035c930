"""What a source type is given for one download, and what it must provide.

`Session` is the per-download state every source shares: the options, the work folder, the stop
signal, the byte/disk limits and progress reporting, the first error our own checks raised, and
the callbacks a streaming download listens on. `Source` is the interface a source type
implements (see `longscribe.service.fetch` for how to add one).
"""

from __future__ import annotations

import logging
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from longscribe.service import netguard
from longscribe.service.errors import JobError
from longscribe.service.fetch.cancel import StopSignal

log = logging.getLogger("longscribe.fetch")

_DISK_CHECK_EVERY = 32 << 20  # re-check free disk space after this many bytes


@dataclass(frozen=True)
class FetchProgress:
    downloaded_bytes: int
    total_bytes: int | None  # None when the server does not say
    speed: float | None  # bytes per second
    eta: float | None  # seconds

    @property
    def fraction(self) -> float | None:
        if not self.total_bytes:
            return None
        return min(self.downloaded_bytes / self.total_bytes, 1.0)


@dataclass(frozen=True)
class Options:
    """The caller's limits and network policy for one download."""

    max_bytes: int = 0  # 0: no limit
    min_free_bytes: int = 0
    socket_timeout: float = 20.0
    allow_private_networks: bool = False
    allow_endpoints: frozenset[netguard.Endpoint] = frozenset()

    @classmethod
    def of(cls, max_bytes: int, min_free_bytes: int, socket_timeout: float,
           allow_private_networks: bool, allow_endpoints: Collection[netguard.Endpoint]
           ) -> Options:
        return cls(max_bytes, min_free_bytes, socket_timeout, allow_private_networks,
                   frozenset(allow_endpoints))


class StopDownload(Exception):
    """Raised by `Session.report` and the limit checks: the download must end now (cancelled,
    over a limit, or refused by the progress callback; the reason is in `Session.failure`)."""


@dataclass
class Session:
    url: str
    work: Path  # the private folder a source writes into; removed when the download ends
    options: Options
    stop: StopSignal
    on_progress: Callable[[FetchProgress], None] | None = None
    # streaming only: bytes landed in `writing` (a path), which will be named like `final_name`
    on_file: Callable[[str | None, str | None], None] | None = None
    # streaming only: the source is about to rewrite its file from byte 0 (the reason)
    on_restart: Callable[[str], None] | None = None
    failure: JobError | None = None
    _checked_disk_at: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, error: JobError) -> JobError:
        """Record the first error our own checks raised; it beats however a library wrapped it."""
        with self._lock:
            if self.failure is None:
                self.failure = error
            return self.failure

    def limit(self, size: int, what: str) -> None:
        max_bytes = self.options.max_bytes
        if max_bytes and size > max_bytes:
            self.fail(JobError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the media {what} ({size:,} bytes) exceeds the download limit of "
                f"{max_bytes:,} bytes (--max-upload-bytes)",
            ))
            raise StopDownload()

    def disk(self, remaining: int) -> None:
        free = shutil.disk_usage(self.work).free
        keep = self.options.min_free_bytes
        if free - remaining < keep:
            self.fail(JobError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"not enough disk space: the download needs {remaining:,} more bytes and "
                f"{free:,} are free (the server keeps {keep:,} free)",
            ))
            raise StopDownload()

    def report(self, done: int, exact_total: int | None, estimated_total: int | None,
               speed: float | None, eta: float | None) -> None:
        """A source calls this as bytes arrive: limits, disk space, the caller's callback.
        Raises StopDownload when the download must end."""
        if self.stop.is_set():
            raise StopDownload()
        if exact_total:  # an estimate (HLS) is not refused on; the running count catches it
            self.limit(exact_total, "size")
        total = exact_total or estimated_total or None
        self.limit(done, "download so far")
        if self._checked_disk_at is None or done - self._checked_disk_at >= _DISK_CHECK_EVERY:
            self._checked_disk_at = done
            self.disk(max((total or 0) - done, 0))
        if self.on_progress is not None:
            try:
                self.on_progress(FetchProgress(done, total, speed, eta))
            except JobError as e:  # the caller wants the download stopped
                self.fail(e)
                raise StopDownload() from None
            except Exception:  # a display bug must not fail the download
                log.exception("the download progress callback failed")


class Source(ABC):
    """One kind of fetcher; an instance serves one download (all of its attempts)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @classmethod
    @abstractmethod
    def check(cls, url: str, options: Options) -> None:
        """Refuse `url` (JobError) before anything is written or fetched."""

    @abstractmethod
    def attempt(self) -> Path:
        """One try: fetch into `session.work` and return the file. Call `session.report` as
        bytes arrive and check `session.stop`. Raise JobError (`retry.Transient` for a failure
        worth retrying); anything else is passed to `classify`."""

    @abstractmethod
    def classify(self, error: BaseException) -> JobError:
        """The JobError (or `retry.Transient`) a foreign exception from `attempt` stands for."""

    @abstractmethod
    def abort(self) -> None:
        """Called from another thread when the download is stopped: make a blocked `attempt`
        return now (e.g. shut its sockets down)."""

    def retry_may_reappend(self) -> bool:
        """True when a retry may append bytes the file already holds (a fragment download
        resumed by index), which a reader of the growing file must not see."""
        return False

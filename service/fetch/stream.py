"""Reading a download while it runs: the growing file's early final name, restart detection,
and the handle of a download running in the background.

The file a source is writing gets a second name (a hard link) in `dest_dir` as soon as its
first bytes land. That name is the one the finished file ends up with, so a reader that tails it
reads the final inode whatever the source renames. yt-dlp appends on a resumed retry (Range
answered 206 with the same start) but rewrites its file from byte 0 when the server ignores the
Range (200) or answers 416, and a retried HLS/DASH download may re-append fragments; before that
happens the link is detached (the source gets a copy to rewrite, the reader's bytes stay put) and
`restarted` is set: whatever was decoded from the growing file is then void.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from longscribe.service.errors import JobError
from longscribe.service.fetch.cancel import StopSignal
from longscribe.service.fetch.workdir import FINAL_FILE, same_file, unique

log = logging.getLogger("longscribe.fetch")


class GrowingFile:
    """The file of a streaming download: early final name, readiness, restart detection."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.work: Path | None = None
        self.part: Path | None = None  # the file the source writes, inside the work folder
        self.final: Path | None = None  # its second name in dest: the finished file's name
        self.container_hint: str | None = None
        self.file_ready = threading.Event()
        self.restarted = threading.Event()
        self._lock = threading.Lock()

    def saw(self, writing: str | None, final_name: str | None) -> None:
        """Bytes landed in `writing` (to be renamed like `final_name`): the first time, link the
        file to its final name in dest."""
        if self.final is not None or self.restarted.is_set() or self.work is None:
            return
        tmp = writing
        if not tmp or tmp == "-" or not os.path.isfile(tmp):
            return
        part = Path(tmp)
        suffix = Path(str(final_name or tmp.removesuffix(".part"))).suffix.lower()
        try:
            final = unique(self.dest, suffix)
            # recorded first, so a process killed right after linking leaves no orphan name
            (self.work / FINAL_FILE).write_text(final.name)
            os.link(part, final)  # same inode: the source's renames never strand a reader
        except (OSError, JobError) as e:
            log.info("cannot stream %s while it downloads: %s", part.name, e)
            return
        with self._lock:
            self.part, self.final, self.container_hint = part, final, suffix
        self.file_ready.set()

    def detach(self, why: str) -> None:
        """The source is about to rewrite its file from byte 0: give it a copy to rewrite, so
        the bytes a reader already took stay as they were, and mark the stream void."""
        with self._lock:
            if self.final is None or self.restarted.is_set():
                return
            self.restarted.set()
            part, final = self.part, self.final
        log.info("the download of %s restarts (%s): streamed decoding is void", final.name, why)
        if part is not None and same_file(part, final):
            copy = part.with_name(part.name + ".copy")
            shutil.copyfile(part, copy)
            os.replace(copy, part)

    def place(self, path: Path) -> Path:
        """Give the finished file `path` its final name in dest."""
        with self._lock:
            final = self.final
        if final is not None and same_file(path, final):
            path.unlink()  # the early name already is the file; drop the source's name for it
            return final
        if final is not None:  # a different file than the one readers were given
            self.restarted.set()
            final.unlink(missing_ok=True)
        final = unique(self.dest, path.suffix.lower())
        os.replace(path, final)
        return final

    def discard(self) -> None:
        with self._lock:
            final, self.final = self.final, None
        if final is not None:
            final.unlink(missing_ok=True)


class DownloadHandle:
    """A download running in a background thread (see `start_download`).

    `file_ready` is set once bytes land in `partial_path` (or the download ended);
    `partial_path` is the file being written, under the name the finished file will have, or
    None (nothing landed yet, or the download restarted); `container_hint` is its extension
    (".mp3") for `audio.can_stream_while_growing`; `restarted` is set when the file a reader
    was given was abandoned (anything decoded from it is void: decode `result()` instead);
    `finished` is set however the download ends."""

    def __init__(self, url: str, stream: GrowingFile, stop: StopSignal) -> None:
        self.url = url
        self._stream = stream
        self.cancel_event = stop
        self.file_ready = stream.file_ready
        self.restarted = stream.restarted
        self.finished = threading.Event()
        self._path: Path | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def partial_path(self) -> Path | None:
        return None if self.restarted.is_set() else self._stream.final

    @property
    def container_hint(self) -> str | None:
        return self._stream.container_hint

    def cancel(self) -> None:
        """Stop the download (not the caller's cancel event: e.g. decoding failed)."""
        self.cancel_event.set()

    def result(self, timeout: float | None = None) -> Path:
        """The finished file; re-raises the download's JobError / Cancelled."""
        if not self.finished.wait(timeout):
            raise TimeoutError(f"the download of {self.url} is still running")
        if self._error is not None:
            raise self._error
        assert self._path is not None
        return self._path

    def _run(self, target: Callable[[], Path]) -> None:
        try:
            self._path = target()
        except BaseException as e:  # handed to whoever calls result()
            self._error = e
        finally:
            self.file_ready.set()  # a waiter on file_ready must not wait for nothing
            self.finished.set()

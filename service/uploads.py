"""Client uploads written to disk as the chunks arrive (never held whole in memory).

    with UploadWriter(job_dir, "talk.m4a", max_bytes=limit) as upload:
        for chunk in stream:
            upload.write(chunk)
    upload.path  # the finished file

Leaving the block with an exception (or calling `abort()`) deletes the partial file; leaving it
normally with nothing written deletes it too and raises INVALID_ARGUMENT.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import unicodedata
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from typing import BinaryIO

import grpc
from longscribe.service.errors import JobError

_UNSAFE = re.compile(r"[^\w.-]+")  # \w is Unicode: "Réunion 東京.mp3" keeps its letters
_MAX_STEM_BYTES = 160  # file systems count a name's UTF-8 bytes (255 at most)
_DISK_CHECK_EVERY = 16 << 20


def sanitize_filename(name: str, default: str = "upload") -> str:
    """A safe file name from a client's: no folders, only letters and digits (any script) and
    ._-, no leading dot, bounded length, and the extension kept (lower-cased) because it hints
    at the container."""
    base = PureWindowsPath(PurePosixPath(name or "").name).name  # drop / and \ folders
    base = _UNSAFE.sub("_", unicodedata.normalize("NFC", base)).strip("._-")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    ext = re.sub(r"[^a-z0-9]", "", ext.lower())[:10]
    stem = stem.encode()[:_MAX_STEM_BYTES].decode(errors="ignore").strip("._-") or default
    return f"{stem}.{ext}" if ext else stem


class UploadWriter:
    """Streams an upload into `dest_dir`, enforcing `max_bytes` (0: no limit)."""

    def __init__(
        self,
        dest_dir: Path | str,
        filename: str,
        max_bytes: int,
        *,
        min_free_bytes: int = 0,
    ) -> None:
        self.dest_dir = Path(dest_dir)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.size = 0
        self.path = self.dest_dir / sanitize_filename(filename)
        self._file: BinaryIO | None = None
        self._checked_disk_at = -_DISK_CHECK_EVERY
        self._closed = False

    def __enter__(self) -> UploadWriter:
        self.dest_dir.mkdir(parents=True, exist_ok=True)
        stem, suffix = self.path.stem, self.path.suffix
        for n in range(1, 10_000):
            try:
                # "x": never overwrite or follow an existing file or link
                self._file = self.path.open("xb")
                return self
            except FileExistsError:
                self.path = self.dest_dir / f"{stem}-{n}{suffix}"
        raise JobError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many uploads in {self.dest_dir}")

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise RuntimeError("UploadWriter.write outside its with-block")
        if self.max_bytes and self.size + len(data) > self.max_bytes:
            raise JobError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the upload exceeds the limit of {self.max_bytes:,} bytes (--max-upload-bytes)",
            )
        if self.min_free_bytes and self.size - self._checked_disk_at >= _DISK_CHECK_EVERY:
            self._checked_disk_at = self.size
            if shutil.disk_usage(self.dest_dir).free - len(data) < self.min_free_bytes:
                raise JobError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the server is low on disk space; the upload was refused",
                )
        self._file.write(data)
        self.size += len(data)

    def abort(self) -> None:
        """Close and delete the partial file."""
        self._close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _close(self) -> None:
        if self._file is not None and not self._closed:
            self._closed = True
            self._file.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self._close()
        except OSError:
            self.abort()
            raise
        if self.size == 0:
            self.abort()
            raise JobError(grpc.StatusCode.INVALID_ARGUMENT, "the upload was empty")

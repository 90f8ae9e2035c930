"""Server-side media paths: a client may name a file only inside the configured media root.

The containment check runs on fully resolved paths (symlinks followed), so a link inside the
root that points out of it is refused. Escapes are refused before existence is checked, so the
answer never tells a client whether a file outside the root exists. A file swapped for a
symlink between this check and the open is a residual race; the returned path is the resolved
real path, which the caller opens directly.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

import grpc
from longscribe.service.errors import JobError


def _denied(relative: str, why: str) -> JobError:
    return JobError(
        grpc.StatusCode.PERMISSION_DENIED, f"the server path {relative!r} is refused: {why}"
    )


def resolve_media_path(media_root: str | Path, relative: str) -> Path:
    """The real path of `relative` under `media_root`, or a JobError saying why not."""
    if not str(media_root):
        raise JobError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "server paths are disabled: start the server with --media-root",
        )
    if not relative or not relative.strip():
        raise JobError(grpc.StatusCode.INVALID_ARGUMENT, "the server path is empty")
    if "\x00" in relative:
        raise JobError(grpc.StatusCode.INVALID_ARGUMENT, "the server path contains a NUL byte")
    try:
        root = Path(media_root).resolve(strict=True)
    except OSError as e:
        raise JobError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the media root {str(media_root)!r} is not usable on the server: {e.strerror}",
        ) from e
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute():
        raise _denied(relative, "give a path relative to the media root, not an absolute one")
    if ".." in PurePosixPath(relative.replace("\\", "/")).parts:
        raise _denied(relative, "'..' may not leave the media root")
    candidate = root / relative
    # Non-strict first: follows whatever links exist, so an escape is refused even when the
    # target is missing (no probing of files outside the root).
    if not candidate.resolve(strict=False).is_relative_to(root):
        raise _denied(relative, "it points outside the media root")
    try:
        real = candidate.resolve(strict=True)
        info = real.stat()
    except FileNotFoundError as e:
        raise JobError(
            grpc.StatusCode.NOT_FOUND, f"no file {relative!r} under the media root"
        ) from e
    except RuntimeError as e:  # symlink loop
        raise JobError(grpc.StatusCode.INVALID_ARGUMENT, f"{relative!r}: {e}") from e
    except OSError as e:
        raise JobError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{relative!r} cannot be opened: {e.strerror}"
        ) from e
    if not real.is_relative_to(root):
        raise _denied(relative, "it points outside the media root")
    if stat.S_ISDIR(info.st_mode):
        raise JobError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{relative!r} is a directory, not a media file"
        )
    if not stat.S_ISREG(info.st_mode):
        raise JobError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{relative!r} is not a regular file"
        )
    if not os.access(real, os.R_OK):
        raise _denied(relative, "the server may not read it")
    return real

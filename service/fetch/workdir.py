"""The private work folder of one download, and the names of finished files.

Everything a download writes goes to a work folder `dest_dir/.fetch-*`, removed however the
download ends. The folder holds an flock while in use; one left behind by a killed process (no
lock held) is adopted by the next download of the same URL, which then resumes its partial file
(with a Range request) instead of starting again. Finished files get a unique name in `dest_dir`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
from longscribe.service.errors import JobError

log = logging.getLogger("longscribe.fetch")

_URL_FILE = "url"
_LOCK_FILE = ".lock"
FINAL_FILE = "final-name"  # the early name a streaming download gave its file in dest


@contextlib.contextmanager
def work_dir(dest: Path, url: str) -> Iterator[Path]:
    """A locked work folder for `url` in `dest` (created if need be), removed on exit."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        work, lock_fd = _claim_work_dir(dest, url)
        _drop_stale_reservation(dest, work)
    except OSError as e:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.errno == errno.ENOSPC else (
            grpc.StatusCode.INTERNAL)
        raise JobError(code, f"the server cannot write to its download folder: {e}") from e
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock_fd)  # after the removal, so no one adopts a half-deleted folder


def _try_lock(folder: Path) -> int | None:
    """An fd holding an exclusive flock on `folder`'s lock file, or None when it is in use."""
    try:
        fd = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _claim_work_dir(dest: Path, url: str) -> tuple[Path, int]:
    """A locked work folder for `url`: an abandoned one for the same URL (to resume its partial
    file), else a new one. Abandoned folders of other URLs are removed; locked ones are left."""
    adopted: tuple[Path, int] | None = None
    for folder in sorted(dest.glob(".fetch-*")):
        if not folder.is_dir() or folder.is_symlink():
            continue
        fd = _try_lock(folder)
        if fd is None:
            continue  # another download is using it
        try:
            same = (folder / _URL_FILE).read_text() == url
        except OSError:
            same = False
        if same and adopted is None:
            adopted = (folder, fd)
            log.info("resuming the interrupted download of %s", url)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)
    if adopted is not None:
        return adopted
    # made under another name and renamed once locked, so no one sees it unlocked
    staging = Path(tempfile.mkdtemp(prefix=".new-fetch-", dir=dest))
    (staging / _URL_FILE).write_text(url)
    fd = _try_lock(staging)
    if fd is None:
        shutil.rmtree(staging, ignore_errors=True)
        raise JobError(grpc.StatusCode.INTERNAL, f"could not lock the work folder {staging}")
    work = dest / ("." + staging.name.removeprefix(".new-"))
    staging.rename(work)
    return work, fd


def unique(dest_dir: Path, suffix: str) -> Path:
    for n in range(10_000):
        candidate = dest_dir / (f"download{suffix}" if n == 0 else f"download-{n}{suffix}")
        if not candidate.exists():
            return candidate
    raise JobError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many downloads in {dest_dir}")


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _drop_stale_reservation(dest: Path, work: Path) -> None:
    """An adopted work folder may come with the early name a killed streaming download gave its
    file in `dest`; that name is a second link to a file in `work`, so it goes."""
    try:
        name = (work / FINAL_FILE).read_text()
    except OSError:
        return
    stale = dest / name
    if Path(name).name != name or not stale.is_file():
        return
    if any(same_file(stale, f) for f in work.iterdir() if f.is_file()):
        stale.unlink(missing_ok=True)

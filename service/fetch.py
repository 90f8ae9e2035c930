"""Download one media URL with the yt-dlp Python API, safely and interruptibly.

Safety: only the URL comes from the request; every yt-dlp option is fixed here. yt-dlp's HTTP
layer is replaced by one request handler whose sockets are opened by `_Guard.open`: every
connection (first request, every redirect hop, every fragment) resolves its host through
`netguard.resolve_checked` and connects to a vetted address (DNS pinned). ffmpeg is pointed at
a path that does not exist, so yt-dlp can never hand a URL to an external program that would
bypass that check, and only natively downloaded protocols are accepted.

Control: yt-dlp's own retries are off; tenacity retries transient failures (connection errors,
timeouts, HTTP 408/429/5xx) with bounded attempts, total time and exponential backoff. The
progress hook enforces the size limit and disk space; cancellation shuts the open sockets down
from a watcher thread, so a stalled read ends at once rather than at the socket timeout.
Everything is written to a private work folder inside `dest_dir`, removed however the call ends.
The folder holds an flock while in use; one left behind by a killed process (no lock held) is
adopted by the next download of the same URL, which then resumes the partial file with a Range
request instead of starting again.

Streaming (`start_download`): the download runs in a thread, and the file yt-dlp is writing gets
a second name (a hard link) in `dest_dir` as soon as its first bytes land. That name is the one
the finished file ends up with, so a reader that tails it reads the final inode whatever yt-dlp
renames. yt-dlp appends on a resumed retry (Range answered 206 with the same start) but
rewrites its file from byte 0 when the server ignores the Range (200) or answers 416, and a
retried HLS/DASH download may re-append fragments; before that happens the link is detached
(yt-dlp gets a copy to rewrite, the reader's bytes stay put) and `DownloadHandle.restarted` is
set: whatever was decoded from the growing file is then void.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import logging
import os
import shutil
import socket
import tempfile
import threading
import weakref
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import grpc
import tenacity
import urllib3
from longscribe.service import netguard
from longscribe.service.errors import Cancelled, JobError
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from yt_dlp import YoutubeDL
from yt_dlp.networking._requests import RequestsRH
from yt_dlp.networking.exceptions import HTTPError, SSLError, TransportError
from yt_dlp.utils import DownloadCancelled, UnsupportedError, parse_http_range

log = logging.getLogger("longscribe.fetch")

# Protocols yt-dlp downloads itself, through our guarded HTTP handler.
NATIVE_PROTOCOLS = frozenset(
    {"http", "https", "m3u8_native", "http_dash_segments", "http_dash_segments_generator"}
)
_TRANSIENT_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))
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
class RetryPolicy:
    """Bounds for retrying transient failures; tests shrink the waits."""

    max_total_seconds: float = 120.0
    initial_wait: float = 1.0
    max_wait: float = 15.0


class _Transient(JobError):
    """A failure worth retrying (network trouble, HTTP 5xx/429)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class _Stop(DownloadCancelled):
    """Raised inside yt-dlp's progress hook to abort; yt-dlp re-raises it unwrapped."""

    msg = "download stopped by longscribe"


class _Guard:
    """Per-download state shared with the HTTP layer: address policy, open sockets, and the
    first JobError our own checks raised (which beats however yt-dlp wrapped it)."""

    def __init__(
        self,
        allow_private_networks: bool,
        allow_endpoints: Collection[netguard.Endpoint],
        cancel: threading.Event | None,
    ) -> None:
        self.allow_private_networks = allow_private_networks
        self.allow_endpoints = frozenset(allow_endpoints)
        self.cancel = cancel
        self.failure: JobError | None = None
        # called (from yt-dlp's thread) when a Range resume is refused, before yt-dlp rewrites
        self.on_resume_refused: Callable[[], None] | None = None
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.pool_classes = _guarded_pool_classes(self)

    def fail(self, error: JobError) -> JobError:
        with self._lock:
            if self.failure is None:
                self.failure = error
            return self.failure

    def open(self, conn: urllib3.connection.HTTPConnection) -> socket.socket:
        """Open the socket for `conn` to a vetted address of its host (pinned: no re-resolve)."""
        if self.cancel is not None and self.cancel.is_set():
            raise NewConnectionError(conn, "the download was cancelled")
        try:
            addresses = netguard.resolve_checked(
                getattr(conn, "_dns_host", conn.host), conn.port, self.allow_private_networks,
                self.allow_endpoints,
            )
        except JobError as e:
            if e.code != grpc.StatusCode.UNAVAILABLE:  # a DNS hiccup stays retryable
                self.fail(e)
            raise NewConnectionError(conn, e.message) from None
        last: OSError | None = None
        for address in addresses:
            try:
                sock = urllib3.util.connection.create_connection(
                    (address, conn.port),
                    conn.timeout,
                    source_address=conn.source_address,
                    socket_options=conn.socket_options,
                )
            except TimeoutError as e:
                raise ConnectTimeoutError(conn, f"connecting to {conn.host} timed out") from e
            except OSError as e:
                last = e
                continue
            with self._lock:
                self._sockets.add(sock)
            return sock
        raise NewConnectionError(conn, f"could not connect to {conn.host}: {last}")

    def abort(self) -> None:
        """Shut every open socket down so a blocked read returns now."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _guarded_pool_classes(guard: _Guard) -> dict[str, type]:
    class Conn(urllib3.connection.HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return guard.open(self)

    class TLSConn(urllib3.connection.HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return guard.open(self)

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = Conn

    class TLSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = TLSConn

    return {"http": Pool, "https": TLSPool}


class GuardedRH(RequestsRH):
    """yt-dlp's requests handler with our socket factory and no proxies at all."""

    guard: _Guard  # set right after yt-dlp builds the handler

    def _create_instance(self, cookiejar: Any, legacy_ssl_support: Any = None) -> Any:
        session = super()._create_instance(cookiejar, legacy_ssl_support)
        for adapter in session.adapters.values():
            adapter.poolmanager.pool_classes_by_scheme = self.guard.pool_classes
        return session

    def _get_proxies(self, request: Any) -> dict[str, str]:
        return {}  # a proxy would connect on the target's behalf, past the address check

    def _send(self, request: Any) -> Any:
        # yt-dlp keeps appending only when a "Range: bytes=N-" (N > 0) gets a 206 starting at N;
        # anything else (200, 416, another start) makes it rewrite its file from byte 0.
        start = parse_http_range(request.headers.get("Range"))[0]
        try:
            response = super()._send(request)
        except HTTPError as e:
            if start and e.status == 416:
                self._refused()
            raise
        if start and (response.status != 206 or parse_http_range(
                response.headers.get("Content-Range"))[0] != start):
            self._refused()
        return response

    def _refused(self) -> None:
        if self.guard.on_resume_refused is not None:
            self.guard.on_resume_refused()


class _GuardedYoutubeDL(YoutubeDL):
    """YoutubeDL whose only request handler is GuardedRH (no urllib, websockets, curl_cffi)."""

    def __init__(self, params: dict[str, Any], guard: _Guard) -> None:
        self._guard = guard
        super().__init__(params)

    def build_request_director(self, handlers: Any, preferences: Any = None) -> Any:
        director = super().build_request_director([GuardedRH], None)
        for handler in director.handlers.values():
            handler.guard = self._guard
        return director


class _Logger:
    """yt-dlp's messages go to our log; errors become JobErrors, so they are logged quietly."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    def info(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    def warning(self, msg: str) -> None:
        if "ffmpeg-location" not in msg:  # our deliberate "no ffmpeg" setting
            log.info("yt-dlp: %s", msg)

    def error(self, msg: str) -> None:
        log.info("yt-dlp: %s", msg)


def _params(work: Path, hook: Callable[[dict[str, Any]], None], timeout: float) -> dict[str, Any]:
    """Every yt-dlp option, fixed: nothing from the request, no files outside `work`."""
    return {
        "format": "bestaudio/best",
        "noplaylist": True,
        "extract_flat": "in_playlist",  # a playlist is reported, never expanded or downloaded
        "paths": {"home": str(work), "temp": str(work)},
        "outtmpl": {"default": "media.%(ext)s"},
        "restrictfilenames": True,
        "overwrites": True,
        "cachedir": False,
        "cookiefile": None,
        "proxy": "",
        "ffmpeg_location": str(work / "ffmpeg-disabled"),  # never run an external fetcher
        "fixup": "never",
        "postprocessors": [],
        "retries": 0,  # tenacity owns retries
        "extractor_retries": 0,
        "file_access_retries": 0,
        "fragment_retries": 3,
        "skip_unavailable_fragments": False,  # a missing fragment is missing speech
        "socket_timeout": timeout,
        "quiet": True,
        "no_warnings": False,
        "noprogress": True,
        "logger": _Logger(),
        "progress_hooks": [hook],
        "updatetime": False,
    }


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and everything it wraps (yt-dlp's exc_info/cause plus Python's chaining)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        exc_info = getattr(e, "exc_info", None)
        wrapped = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) > 1 else None
        todo += [wrapped, getattr(e, "cause", None), e.__cause__, e.__context__]


def _message(error: BaseException) -> str:
    text = getattr(error, "orig_msg", None) or getattr(error, "msg", None) or str(error)
    return str(text).removeprefix("ERROR: ").strip()


def _classify(error: BaseException, url: str) -> JobError:
    for e in _chain(error):
        if isinstance(e, HTTPError):
            status = e.status
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = e.reason or ""
            said = f"HTTP {status} {phrase}".strip()
            if status in (404, 410):
                return JobError(grpc.StatusCode.NOT_FOUND, f"the URL returned {said}: {url}")
            if status in (401, 403, 407, 451):
                return JobError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the server refused access ({said}): {url}",
                )
            if status in _TRANSIENT_STATUSES:
                return _Transient(f"the server answered {said}: {url}")
            return JobError(grpc.StatusCode.INVALID_ARGUMENT, f"the URL returned {said}: {url}")
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return JobError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of disk space downloading"
            )
        if isinstance(e, SSLError):  # not transient: the same certificate comes back
            return JobError(
                grpc.StatusCode.UNAVAILABLE,
                f"a TLS connection to {url} failed (is its certificate valid?): {_message(e)}",
            )
        if isinstance(e, UnsupportedError):
            return JobError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no audio or video found at {url} (not a media file, and not a page yt-dlp "
                "knows how to read)",
            )
        if isinstance(e, (TransportError, TimeoutError, ConnectionError)):
            return _Transient(f"network error fetching {url}: {_message(e)}")
    message = _message(error)
    if "[download] Got error:" in message:
        # yt-dlp's HTTP downloader reports the failures it would retry itself (dropped
        # connections, short reads, timeouts, 5xx mid-download) this way, without the cause
        return _Transient(f"the download of {url} broke off: {message.split('Got error:')[-1]}")
    return JobError(grpc.StatusCode.INVALID_ARGUMENT, f"could not download {url}: {message}")


def _looks_like_text(path: Path) -> bool:
    """True for text (HTML, JSON, plain): every media container starts with binary bytes.
    yt-dlp hands any non-HTML answer on as a "direct link", so this is where text is caught."""
    with path.open("rb") as f:
        head = f.read(4096)
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a real decoding error, not a character cut at the end
            return False
        text = head[: e.start].decode("utf-8")
    return all(c.isprintable() or c in "\r\n\t\f" for c in text)


class _Attempt:
    """One yt-dlp run: extract, vet what it found, download into `work`."""

    def __init__(
        self,
        url: str,
        work: Path,
        guard: _Guard,
        on_progress: Callable[[FetchProgress], None] | None,
        max_bytes: int,
        min_free_bytes: int,
        socket_timeout: float,
    ) -> None:
        self.url = url
        self.work = work
        self.guard = guard
        self.on_progress = on_progress
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.socket_timeout = socket_timeout
        self._checked_disk_at: int | None = None
        self.on_file: Callable[[dict[str, Any]], None] | None = None  # streaming only
        self.protocols: set[str] = set()

    def _limit(self, size: int, what: str) -> None:
        if self.max_bytes and size > self.max_bytes:
            self.guard.fail(JobError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the media {what} ({size:,} bytes) exceeds the download limit of "
                f"{self.max_bytes:,} bytes (--max-upload-bytes)",
            ))
            raise _Stop()

    def _disk(self, remaining: int) -> None:
        free = shutil.disk_usage(self.work).free
        if free - remaining < self.min_free_bytes:
            self.guard.fail(JobError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"not enough disk space: the download needs {remaining:,} more bytes and "
                f"{free:,} are free (the server keeps {self.min_free_bytes:,} free)",
            ))
            raise _Stop()

    def hook(self, d: dict[str, Any]) -> None:
        cancel = self.guard.cancel
        if cancel is not None and cancel.is_set():
            raise _Stop()
        if self.on_file is not None and d.get("status") == "downloading":
            self.on_file(d)
        done = int(d.get("downloaded_bytes") or 0)
        exact = d.get("total_bytes")
        if exact:  # an estimate (HLS) is not refused on; the running count catches it
            self._limit(int(exact), "size")
        total = exact or d.get("total_bytes_estimate")
        total = int(total) if total else None
        self._limit(done, "download so far")
        if self._checked_disk_at is None or done - self._checked_disk_at >= _DISK_CHECK_EVERY:
            self._checked_disk_at = done
            self._disk(max((total or 0) - done, 0))
        if self.on_progress is not None:
            try:
                self.on_progress(FetchProgress(done, total, d.get("speed"), d.get("eta")))
            except JobError as e:  # the caller wants the download stopped
                self.guard.fail(e)
                raise _Stop() from None
            except Exception:  # a display bug must not fail the download
                log.exception("the download progress callback failed")

    def _vet(self, info: dict[str, Any]) -> None:
        kind = info.get("_type", "video")
        if kind in ("playlist", "multi_video"):
            entries = info.get("entries")
            count = f"{len(entries)} items" if isinstance(entries, list) else "several items"
            raise JobError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.url} is a playlist ({count}); submit the URL of one item",
            )
        if info.get("is_live") or info.get("live_status") in ("is_live", "is_upcoming"):
            raise JobError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.url} is a live stream; only recorded media can be transcribed",
            )
        formats = info.get("requested_formats") or [info]
        self.protocols = {str(f.get("protocol") or "") for f in formats}
        for fmt in formats:
            protocol = str(fmt.get("protocol") or "")
            if protocol not in NATIVE_PROTOCOLS:
                raise JobError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{self.url} needs the {protocol or 'unknown'} protocol, which this server "
                    "does not fetch (only HTTP(S), HLS and DASH)",
                )
        size = sum(int(f.get("filesize") or f.get("filesize_approx") or 0) for f in formats)
        if size:
            self._limit(size, "size")
            self._disk(size)

    def run(self) -> Path:
        with _GuardedYoutubeDL(_params(self.work, self.hook, self.socket_timeout), self.guard) as y:
            info = y.extract_info(self.url, download=False)
            self._vet(info)
            info = y.process_ie_result(info, download=True)
        paths = [Path(d["filepath"]) for d in info.get("requested_downloads") or []]
        path = next((p for p in paths if p.is_file()), None)
        if path is None or not path.resolve().is_relative_to(self.work.resolve()):
            raise JobError(
                grpc.StatusCode.INVALID_ARGUMENT, f"yt-dlp produced no media file for {self.url}"
            )
        if path.stat().st_size == 0:
            raise JobError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{self.url} returned an empty body, not media"
            )
        if _looks_like_text(path):
            raise JobError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.url} is not audio or video: it returned a text/HTML document",
            )
        return path


def _watch(cancel: threading.Event, guard: _Guard, done: threading.Event) -> None:
    while not done.wait(0.05):
        if cancel.is_set():
            guard.abort()
            return


_URL_FILE = "url"
_LOCK_FILE = ".lock"
_FINAL_FILE = "final-name"  # the early name a streaming download gave its file in dest


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


def _unique(dest_dir: Path, suffix: str) -> Path:
    for n in range(10_000):
        candidate = dest_dir / (f"download{suffix}" if n == 0 else f"download-{n}{suffix}")
        if not candidate.exists():
            return candidate
    raise JobError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many downloads in {dest_dir}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _drop_stale_reservation(dest: Path, work: Path) -> None:
    """An adopted work folder may come with the early name a killed streaming download gave its
    file in `dest`; that name is a second link to a file in `work`, so it goes."""
    try:
        name = (work / _FINAL_FILE).read_text()
    except OSError:
        return
    stale = dest / name
    if Path(name).name != name or not stale.is_file():
        return
    if any(_same_file(stale, f) for f in work.iterdir() if f.is_file()):
        stale.unlink(missing_ok=True)


class _Stream:
    """The file of a streaming download: early final name, readiness, restart detection."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.work: Path | None = None
        self.part: Path | None = None  # the file yt-dlp writes, inside the work folder
        self.final: Path | None = None  # its second name in dest: the finished file's name
        self.container_hint: str | None = None
        self.file_ready = threading.Event()
        self.restarted = threading.Event()
        self._lock = threading.Lock()

    def saw(self, d: dict[str, Any]) -> None:
        """Progress hook: the first time bytes land, link yt-dlp's file to its final name."""
        if self.final is not None or self.restarted.is_set() or self.work is None:
            return
        tmp = d.get("tmpfilename")
        if not tmp or tmp == "-" or not os.path.isfile(tmp):
            return
        part = Path(tmp)
        suffix = Path(str(d.get("filename") or tmp.removesuffix(".part"))).suffix.lower()
        try:
            final = _unique(self.dest, suffix)
            # recorded first, so a process killed right after linking leaves no orphan name
            (self.work / _FINAL_FILE).write_text(final.name)
            os.link(part, final)  # same inode: yt-dlp's renames never strand a reader
        except (OSError, JobError) as e:
            log.info("cannot stream %s while it downloads: %s", part.name, e)
            return
        with self._lock:
            self.part, self.final, self.container_hint = part, final, suffix
        self.file_ready.set()

    def detach(self, why: str) -> None:
        """yt-dlp is about to rewrite its file from byte 0: give it a copy to rewrite, so the
        bytes a reader already took stay as they were, and mark the stream void."""
        with self._lock:
            if self.final is None or self.restarted.is_set():
                return
            self.restarted.set()
            part, final = self.part, self.final
        log.info("the download of %s restarts (%s): streamed decoding is void", final.name, why)
        if part is not None and _same_file(part, final):
            copy = part.with_name(part.name + ".copy")
            shutil.copyfile(part, copy)
            os.replace(copy, part)

    def place(self, path: Path) -> Path:
        """Give the finished file `path` its final name in dest."""
        with self._lock:
            final = self.final
        if final is not None and _same_file(path, final):
            path.unlink()  # the early name already is the file; drop yt-dlp's name for it
            return final
        if final is not None:  # a different file than the one readers were given
            self.restarted.set()
            final.unlink(missing_ok=True)
        final = _unique(self.dest, path.suffix.lower())
        os.replace(path, final)
        return final

    def discard(self) -> None:
        with self._lock:
            final, self.final = self.final, None
        if final is not None:
            final.unlink(missing_ok=True)


def download(
    url: str,
    dest_dir: Path | str,
    *,
    on_progress: Callable[[FetchProgress], None] | None = None,
    cancel: threading.Event | None = None,
    max_bytes: int = 0,
    allow_private_networks: bool = False,
    retries: int = 3,
    retry_policy: RetryPolicy | None = None,
    min_free_bytes: int = 0,
    socket_timeout: float = 20.0,
    allow_endpoints: Collection[netguard.Endpoint] = (),
) -> Path:
    """Download the best audio (or best) format of `url` into `dest_dir`; return its path.

    `retries`: extra attempts after a transient failure (so at most retries + 1 attempts, also
    bounded by `retry_policy.max_total_seconds`). `max_bytes` 0 means no limit.
    `allow_endpoints`: (ip, port) pairs allowed even when private (see netguard.check_url).
    Raises JobError (see _classify for the codes) or errors.Cancelled."""
    return _download(
        url, dest_dir, None, on_progress=on_progress, cancel=cancel, max_bytes=max_bytes,
        allow_private_networks=allow_private_networks, retries=retries,
        retry_policy=retry_policy, min_free_bytes=min_free_bytes, socket_timeout=socket_timeout,
        allow_endpoints=allow_endpoints,
    )


def _download(
    url: str,
    dest_dir: Path | str,
    stream: _Stream | None,
    *,
    on_progress: Callable[[FetchProgress], None] | None,
    cancel: threading.Event | None,
    max_bytes: int,
    allow_private_networks: bool,
    retries: int,
    retry_policy: RetryPolicy | None,
    min_free_bytes: int,
    socket_timeout: float,
    allow_endpoints: Collection[netguard.Endpoint],
) -> Path:
    netguard.check_url(url, allow_private_networks, allow_endpoints)
    if cancel is not None and cancel.is_set():
        raise Cancelled("the download was cancelled")
    policy = retry_policy or RetryPolicy()
    dest = Path(dest_dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        work, lock_fd = _claim_work_dir(dest, url)
        _drop_stale_reservation(dest, work)
    except OSError as e:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.errno == errno.ENOSPC else (
            grpc.StatusCode.INTERNAL)
        raise JobError(code, f"the server cannot write to its download folder: {e}") from e
    guard = _Guard(allow_private_networks, allow_endpoints, cancel)
    done = threading.Event()
    watcher = None
    if cancel is not None:
        watcher = threading.Thread(target=_watch, args=(cancel, guard, done), daemon=True)
        watcher.start()
    attempt = _Attempt(url, work, guard, on_progress, max_bytes, min_free_bytes, socket_timeout)
    if stream is not None:
        stream.work = work
        attempt.on_file = stream.saw
        guard.on_resume_refused = lambda: stream.detach("the server refused to resume")
    tries = 0

    def one_try() -> Path:
        nonlocal tries
        tries += 1
        if stream is not None and tries > 1 and not attempt.protocols <= {"http", "https"}:
            # a retried fragment download resumes by fragment index, which can re-append
            stream.detach("a retried fragmented download")
        try:
            return attempt.run()
        except JobError:
            raise
        except Exception as e:  # yt-dlp's errors: classify; our own checks take precedence
            if cancel is not None and cancel.is_set():
                raise Cancelled("the download was cancelled") from None
            if guard.failure is not None:
                raise guard.failure from None
            raise _classify(e, url) from e

    def pause(seconds: float) -> None:
        if cancel is not None and cancel.wait(seconds):
            raise Cancelled("the download was cancelled")
        if cancel is None:
            tenacity.nap.sleep(seconds)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(retries + 1)
        | tenacity.stop_after_delay(policy.max_total_seconds),
        wait=tenacity.wait_exponential(multiplier=policy.initial_wait, max=policy.max_wait),
        retry=tenacity.retry_if_exception_type(_Transient),
        sleep=pause,
        before_sleep=lambda state: log.info(
            "retrying %s after attempt %d: %s", url, state.attempt_number, state.outcome.exception()
        ),
        reraise=True,
    )
    placed = False
    try:
        try:
            path = retrying(one_try)
        except _Transient as e:
            tried = retrying.statistics.get("attempt_number", 1)
            raise JobError(
                grpc.StatusCode.UNAVAILABLE, f"{e.message} (gave up after {tried} attempts)"
            ) from None
        if stream is not None:
            final = stream.place(path)
        else:
            final = _unique(dest, path.suffix.lower())
            os.replace(path, final)
        placed = True
        return final
    finally:
        done.set()
        if watcher is not None:
            watcher.join()
        if stream is not None and not placed:
            stream.discard()  # a failed download leaves no file, not even the early name
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock_fd)  # after the removal, so no one adopts a half-deleted folder


class DownloadHandle:
    """A download running in a background thread (see `start_download`).

    `file_ready` is set once bytes land in `partial_path` (or the download ended);
    `partial_path` is the file being written, under the name the finished file will have, or
    None (nothing landed yet, or the download restarted); `container_hint` is its extension
    (".mp3") for `audio.can_stream_while_growing`; `restarted` is set when the file a reader
    was given was abandoned (anything decoded from it is void: decode `result()` instead);
    `finished` is set however the download ends."""

    def __init__(self, url: str, stream: _Stream, cancel: threading.Event) -> None:
        self.url = url
        self._stream = stream
        self.cancel_event = cancel
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


def _follow(outer: threading.Event, inner: threading.Event, finished: threading.Event) -> None:
    while not finished.wait(0.05):
        if outer.is_set():
            inner.set()
            return


def start_download(url: str, dest_dir: Path | str, **options: Any) -> DownloadHandle:
    """Run `download(url, dest_dir, **options)` in a background thread; return its handle.

    The download stops on `handle.cancel()` (its own event, so a caller can stop the download,
    e.g. when decoding failed, without cancelling the job) or when `options["cancel"]` is set."""
    inspect.signature(download).bind(url, dest_dir, **options)  # a bad keyword fails here
    outer: threading.Event | None = options.pop("cancel", None)
    cancel = threading.Event()
    defaults = {
        name: p.default for name, p in inspect.signature(download).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    stream = _Stream(Path(dest_dir))
    handle = DownloadHandle(url, stream, cancel)
    kwargs = {**defaults, **options, "cancel": cancel}
    thread = threading.Thread(
        target=handle._run, args=(lambda: _download(url, dest_dir, stream, **kwargs),),
        name="fetch", daemon=True,
    )
    handle._thread = thread
    thread.start()
    if outer is not None:
        threading.Thread(target=_follow, args=(outer, cancel, handle.finished), name="fetch-cancel",
                         daemon=True).start()
    return handle

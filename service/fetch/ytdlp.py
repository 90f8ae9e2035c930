"""The yt-dlp source: http(s) URLs of media files or of pages yt-dlp knows how to read.

Safety: only the URL comes from the request; every yt-dlp option is fixed here. All HTTP goes
through `guard` (SSRF-checked, DNS pinned, no proxies). ffmpeg is pointed at a path that does not
exist, so yt-dlp can never hand a URL to an external program that would bypass that check, and
only natively downloaded protocols are accepted. yt-dlp's own retries are off (see `retry`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from longscribe.service import netguard
from longscribe.service.errors import JobError
from longscribe.service.fetch.classify import classify
from longscribe.service.fetch.guard import Guard, GuardedYoutubeDL
from longscribe.service.fetch.session import Options, Session, Source, StopDownload
from yt_dlp.utils import DownloadCancelled

log = logging.getLogger("longscribe.fetch")

# Protocols yt-dlp downloads itself, through our guarded HTTP handler.
NATIVE_PROTOCOLS = frozenset(
    {"http", "https", "m3u8_native", "http_dash_segments", "http_dash_segments_generator"}
)


class _Stop(DownloadCancelled):
    """Raised inside yt-dlp's progress hook to abort; yt-dlp re-raises it unwrapped."""

    msg = "download stopped by longscribe"


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


class YtDlpSource(Source):
    """One yt-dlp download: each attempt extracts, vets what it found, downloads into `work`."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.guard = Guard(session)
        self.protocols: set[str] = set()

    @classmethod
    def check(cls, url: str, options: Options) -> None:
        netguard.check_url(url, options.allow_private_networks, options.allow_endpoints)

    def abort(self) -> None:
        self.guard.abort()

    def classify(self, error: BaseException) -> JobError:
        return classify(error, self.session.url)

    def retry_may_reappend(self) -> bool:
        # a retried fragment download resumes by fragment index, which can re-append
        return not self.protocols <= {"http", "https"}

    def hook(self, d: dict[str, Any]) -> None:
        session = self.session
        try:
            if session.stop.is_set():
                raise StopDownload()
            if session.on_file is not None and d.get("status") == "downloading":
                session.on_file(d.get("tmpfilename"), d.get("filename"))
            exact = d.get("total_bytes")
            estimate = d.get("total_bytes_estimate")
            session.report(int(d.get("downloaded_bytes") or 0),
                           int(exact) if exact else None, int(estimate) if estimate else None,
                           d.get("speed"), d.get("eta"))
        except StopDownload:
            raise _Stop() from None

    def _vet(self, info: dict[str, Any]) -> None:
        url = self.session.url
        kind = info.get("_type", "video")
        if kind in ("playlist", "multi_video"):
            entries = info.get("entries")
            count = f"{len(entries)} items" if isinstance(entries, list) else "several items"
            raise JobError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{url} is a playlist ({count}); submit the URL of one item",
            )
        if info.get("is_live") or info.get("live_status") in ("is_live", "is_upcoming"):
            raise JobError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{url} is a live stream; only recorded media can be transcribed",
            )
        formats = info.get("requested_formats") or [info]
        self.protocols = {str(f.get("protocol") or "") for f in formats}
        for fmt in formats:
            protocol = str(fmt.get("protocol") or "")
            if protocol not in NATIVE_PROTOCOLS:
                raise JobError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{url} needs the {protocol or 'unknown'} protocol, which this server "
                    "does not fetch (only HTTP(S), HLS and DASH)",
                )
        size = sum(int(f.get("filesize") or f.get("filesize_approx") or 0) for f in formats)
        if size:  # StopDownload from here ends the attempt like any stop (see `failure`)
            self.session.limit(size, "size")
            self.session.disk(size)

    def attempt(self) -> Path:
        url, work = self.session.url, self.session.work
        params = _params(work, self.hook, self.session.options.socket_timeout)
        with GuardedYoutubeDL(params, self.guard) as y:
            info = y.extract_info(url, download=False)
            self._vet(info)
            info = y.process_ie_result(info, download=True)
        paths = [Path(d["filepath"]) for d in info.get("requested_downloads") or []]
        path = next((p for p in paths if p.is_file()), None)
        if path is None or not path.resolve().is_relative_to(work.resolve()):
            raise JobError(
                grpc.StatusCode.INVALID_ARGUMENT, f"yt-dlp produced no media file for {url}"
            )
        if path.stat().st_size == 0:
            raise JobError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{url} returned an empty body, not media"
            )
        if _looks_like_text(path):
            raise JobError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{url} is not audio or video: it returned a text/HTML document",
            )
        return path

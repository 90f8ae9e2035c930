"""yt-dlp's failures as JobError statuses: what a person reading the job's error can act on, and
whether it is worth another attempt (`Transient`)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from http import HTTPStatus

import grpc
from longscribe.service.errors import JobError
from longscribe.service.fetch.retry import Transient
from yt_dlp.networking.exceptions import HTTPError, SSLError, TransportError
from yt_dlp.utils import UnsupportedError

TRANSIENT_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))


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


def classify(error: BaseException, url: str) -> JobError:
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
            if status in TRANSIENT_STATUSES:
                return Transient(f"the server answered {said}: {url}")
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
            return Transient(f"network error fetching {url}: {_message(e)}")
    message = _message(error)
    if "[download] Got error:" in message:
        # yt-dlp's HTTP downloader reports the failures it would retry itself (dropped
        # connections, short reads, timeouts, 5xx mid-download) this way, without the cause
        return Transient(f"the download of {url} broke off: {message.split('Got error:')[-1]}")
    return JobError(grpc.StatusCode.INVALID_ARGUMENT, f"could not download {url}: {message}")

"""Fetch one media URL to a local file, safely, interruptibly, readable while it downloads.

    from longscribe.service.fetch import download, start_download

    path = download(url, folder, on_progress=..., cancel=job_cancel_event, max_bytes=...)
    handle = start_download(url, folder, ...)   # background; handle.partial_path grows

Modules, one job each:

- `download`: the public entry; source-independent (work folder, stop signal, retries, the
  finished file's name), in the caller's thread or in one background thread.
- `sources`: the registry, URL scheme → `Source` type.
- `session`: what a source is given (`Session`: options, limits, progress, stop signal, first
  error) and the `Source` interface it implements.
- `ytdlp`: the yt-dlp source (fixed options, extraction vetting, progress hook).
- `guard`: yt-dlp's HTTP layer with every connection SSRF-checked and DNS-pinned (netguard).
- `classify`: yt-dlp's failures as JobError statuses, and which are worth a retry.
- `retry`: tenacity retries of `Transient` failures, bounded in attempts and time.
- `stream`: the growing file's early final name, restart detection, `DownloadHandle`.
- `workdir`: the locked private work folder (resumed after a crash) and its removal.
- `cancel`: `StopSignal`, the one stop signal every part of a download checks and waits on.

Threads: `download` runs in the caller's thread, `start_download` in one thread ("fetch"). Only
when a caller's cancel event is given does one more thread ("fetch-cancel") wait on it, to stop
the download at once (sockets shut down) when it is set.

Adding a source type (say `s3://`): write `fetch/s3.py` with a `session.Source` subclass
(`check` refuses bad URLs before anything is written; `attempt` writes one try into
`session.work`, calls `session.report(...)` as bytes arrive and returns the file; `classify`
maps its library's errors to JobError, `retry.Transient` for those worth retrying; `abort`
unblocks a blocked read), then add `"s3": S3Source` to `SOURCES` in `sources.py`. Limits,
retries, cancellation, cleanup and reading while it downloads come from the package.
"""

from longscribe.service.fetch.download import download, start_download
from longscribe.service.fetch.retry import RetryPolicy, Transient
from longscribe.service.fetch.session import FetchProgress, Source
from longscribe.service.fetch.sources import SOURCES
from longscribe.service.fetch.stream import DownloadHandle
from longscribe.service.fetch.ytdlp import NATIVE_PROTOCOLS

__all__ = [
    "NATIVE_PROTOCOLS",
    "SOURCES",
    "DownloadHandle",
    "FetchProgress",
    "RetryPolicy",
    "Source",
    "Transient",
    "download",
    "start_download",
]

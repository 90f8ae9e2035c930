"""The public entry: fetch one URL into a folder, in the caller's thread (`download`) or in the
background with the file readable while it grows (`start_download`). Source-independent: the
work folder, the stop signal, retries and the final name are handled here for every source."""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from longscribe.service import netguard
from longscribe.service.errors import Cancelled, JobError
from longscribe.service.fetch.cancel import StopSignal
from longscribe.service.fetch.retry import RetryPolicy, with_retries
from longscribe.service.fetch.session import FetchProgress, Options, Session
from longscribe.service.fetch.sources import source_for
from longscribe.service.fetch.stream import DownloadHandle, GrowingFile
from longscribe.service.fetch.workdir import unique, work_dir


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
    Raises JobError (see classify for the codes) or errors.Cancelled."""
    return _download(
        url, dest_dir, None, on_progress=on_progress, cancel=cancel, max_bytes=max_bytes,
        allow_private_networks=allow_private_networks, retries=retries,
        retry_policy=retry_policy, min_free_bytes=min_free_bytes, socket_timeout=socket_timeout,
        allow_endpoints=allow_endpoints,
    )


def start_download(url: str, dest_dir: Path | str, **options: Any) -> DownloadHandle:
    """Run `download(url, dest_dir, **options)` in a background thread; return its handle.

    The download stops on `handle.cancel()` (its own signal, so a caller can stop the download,
    e.g. when decoding failed, without cancelling the job) or when `options["cancel"]` is set."""
    inspect.signature(download).bind(url, dest_dir, **options)  # a bad keyword fails here
    stop = StopSignal(options.pop("cancel", None))
    defaults = {
        name: p.default for name, p in inspect.signature(download).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    stream = GrowingFile(Path(dest_dir))
    handle = DownloadHandle(url, stream, stop)
    kwargs = {**defaults, **options, "cancel": stop}
    thread = threading.Thread(
        target=handle._run, args=(lambda: _download(url, dest_dir, stream, **kwargs),),
        name="fetch", daemon=True,
    )
    handle._thread = thread
    thread.start()
    return handle


def _download(
    url: str,
    dest_dir: Path | str,
    stream: GrowingFile | None,
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
    options = Options.of(max_bytes, min_free_bytes, socket_timeout, allow_private_networks,
                         allow_endpoints)
    source_type = source_for(url)
    source_type.check(url, options)
    stop = cancel if isinstance(cancel, StopSignal) else StopSignal(cancel)
    if stop.is_set():
        raise Cancelled("the download was cancelled")
    policy = retry_policy or RetryPolicy()
    dest = Path(dest_dir)
    finished = threading.Event()  # ends the thread that follows the caller's cancel event
    with work_dir(dest, url) as work:
        session = Session(url, work, options, stop, on_progress)
        source = source_type(session)
        stop.on_set(source.abort)
        stop.follow_parent(until=finished)
        if stream is not None:
            stream.work = work
            session.on_file = stream.saw
            session.on_restart = stream.detach
        tries = 0

        def one_try() -> Path:
            nonlocal tries
            tries += 1
            if stream is not None and tries > 1 and source.retry_may_reappend():
                stream.detach("a retried fragmented download")
            try:
                return source.attempt()
            except JobError:
                raise
            except Exception as e:  # the source's own errors: our own checks take precedence
                if stop.is_set():
                    raise Cancelled("the download was cancelled") from None
                if session.failure is not None:
                    raise session.failure from None
                raise source.classify(e) from e

        placed = False
        try:
            path = with_retries(one_try, url=url, retries=retries, policy=policy, stop=stop)
            if stream is not None:
                final = stream.place(path)
            else:
                final = unique(dest, path.suffix.lower())
                os.replace(path, final)
            placed = True
            return final
        finally:
            finished.set()
            if stream is not None and not placed:
                stream.discard()  # a failed download leaves no file, not even the early name

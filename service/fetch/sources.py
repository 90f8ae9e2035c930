"""The source registry: URL scheme → the `Source` type that fetches it."""

from __future__ import annotations

from urllib.parse import urlsplit

import grpc
from longscribe.service.errors import JobError
from longscribe.service.fetch.session import Source
from longscribe.service.fetch.ytdlp import YtDlpSource

SOURCES: dict[str, type[Source]] = {
    "http": YtDlpSource,
    "https": YtDlpSource,
}


def source_for(url: str) -> type[Source]:
    """The source type for `url`'s scheme, or INVALID_ARGUMENT naming the schemes served."""
    try:
        scheme = urlsplit(url.strip()).scheme.lower()
    except ValueError as e:
        raise JobError(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid URL ({e}): {url!r}") from e
    source = SOURCES.get(scheme)
    if source is None:
        shown = f"{scheme}:" if scheme else "no scheme"
        schemes = [f"{s}://" for s in SOURCES]
        served = " and ".join([", ".join(schemes[:-1]), schemes[-1]] if len(schemes) > 1
                              else schemes)
        raise JobError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"only {served} URLs can be fetched, not {shown} ({url[:200]!r})",
        )
    return source

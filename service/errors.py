"""The one error type a job or request fails with: a gRPC status code and a message a person can
act on. Every layer raises JobError; only the API layer turns it into an RPC status."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import grpc


class JobError(Exception):
    """A failure with a gRPC status code, e.g. JobError(grpc.StatusCode.INVALID_ARGUMENT, "...")."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"JobError({self.code.name}, {self.message!r})"


class Cancelled(JobError):
    """The job was cancelled (by CancelJob, a disconnect, or shutdown)."""

    def __init__(self, message: str = "job was cancelled") -> None:
        super().__init__(grpc.StatusCode.CANCELLED, message)


def invalid(message: str) -> JobError:
    return JobError(grpc.StatusCode.INVALID_ARGUMENT, message)


def exhausted(message: str) -> JobError:
    return JobError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


MAX_MESSAGE_CHARS = 1000


def redact_paths(message: str, roots: Iterable[str | os.PathLike[str]]) -> str:
    """The message with every path under one of the server's folders (data dir, media root)
    cut to its last part: clients learn which file, not the server's layout."""
    for root in roots:
        text = str(root).rstrip("/")
        if not text or text == ".":
            continue
        for prefix in {text, os.path.realpath(text)}:
            message = re.sub(re.escape(prefix) + r"/(?:[^\s'\"]*/)?([^\s/'\"]*)", r"\1",
                             message)
    return message


def bounded(message: str) -> str:
    """Messages may quote client input; a status message over the transport's header limit
    would turn the answer into RESOURCE_EXHAUSTED, so keep it short."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "…"

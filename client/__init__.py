"""The longscribe client: a small Python API and the `longscribe` command.

    from longscribe.client import LongscribeClient
    with LongscribeClient("127.0.0.1:50051") as client:
        print(client.transcribe("talk.mp3").text)

Base install only (grpcio, protobuf, tqdm): importing this never loads the server packages."""

from __future__ import annotations

from .client import DEFAULT_TARGET, LongscribeClient, make_options
from .errors import LongscribeError

__all__ = ["DEFAULT_TARGET", "LongscribeClient", "LongscribeError", "make_options"]

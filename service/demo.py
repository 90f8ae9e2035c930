"""`make demo`: start a server, transcribe real speech through gRPC, print it, stop the server.

Usage: python -m longscribe.service.demo [SOURCE]
SOURCE is a local media file or an http(s) URL; by default the JFK inaugural clip from the
test data beside the checkout (../shared/testdata/jfk.flac)."""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

from longscribe.client.client import LongscribeClient
from longscribe.client.progress import make_progress
from longscribe.service import config as config_module
from longscribe.service.server import LongscribeServer, setup_logging

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = [
    REPO.parent / "shared" / "testdata" / "jfk.flac",
    Path.cwd().parent / "shared" / "testdata" / "jfk.flac",
]


def _default_source() -> str | None:
    return next((str(p) for p in DEFAULT_SAMPLES if p.is_file()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = args[0] if args else _default_source()
    if source is None:
        print("no sample found at ../shared/testdata/jfk.flac; give one: "
              "make demo DEMO_SOURCE=/path/to/speech.mp3 (or an http(s) URL)", file=sys.stderr)
        return 2
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="longscribe-demo-") as data_dir:
        config = config_module.from_env(
            host="127.0.0.1", port=_free_port(), data_dir=data_dir, metrics_port=0)
        server = LongscribeServer(config)
        server.start()
        try:
            print(f"server on 127.0.0.1:{server.port}; loading the model…", file=sys.stderr)
            server.ready.wait()
            if server.model_error is not None:
                print(f"the model did not load: {server.model_error}", file=sys.stderr)
                return 1
            print(f"transcribing {source}", file=sys.stderr)
            with LongscribeClient(f"127.0.0.1:{server.port}") as client, \
                    make_progress("auto", sys.stderr) as progress:
                result = client.transcribe(source, on_event=progress.on_event,
                                           on_upload=progress.on_upload)
        finally:
            server.stop(grace=2.0)
    print(f"\n--- transcript ({result.duration_seconds:.1f} s of audio, "
          f"{len(result.segments)} segments) ---")
    print(result.formats.txt or result.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

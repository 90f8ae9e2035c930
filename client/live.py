"""`longscribe live SOURCE…`: stream audio to TranscribeLive and print what comes back.

A SOURCE is a media file (decoded by ffmpeg to 16 kHz mono s16le, sent at `--pace` times real
time) or `-`: raw PCM s16le 16 kHz mono on stdin, sent as it arrives (so
`ffmpeg -f pulse -i default -ac 1 -ar 16000 -f s16le - | longscribe live -` works from a mic).
Several SOURCEs are several sources of one session (e.g. a mic and the system's audio).

On a terminal, partial results update in place and finals print as lines; `--json` prints
every LiveEvent as a JSON line. EOF on every source ends the session cleanly (the server
sends the last finals, then `end`); Ctrl-C does the same with what was sent so far (a second
Ctrl-C leaves at once)."""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import grpc
from google.protobuf import json_format
from longscribe.v1 import transcription_pb2 as pb

from .client import LongscribeClient, make_options
from .errors import LongscribeError
from .render import clock

SAMPLE_RATE = 16000
BYTES_PER_SAMPLE = 2


@dataclass
class LiveSource:
    name: str
    path: str  # a file, or "-" for stdin


def source_names(paths: list[str], names: list[str] | None) -> list[LiveSource]:
    """Each SOURCE with a name: --name in order, else the file's stem ("stdin" for -)."""
    out: list[LiveSource] = []
    seen: set[str] = set()
    for i, path in enumerate(paths):
        if names and i < len(names):
            name = names[i]
        else:
            stem = "stdin" if path == "-" else os.path.splitext(os.path.basename(path))[0]
            name = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:48] or "source"
        base, k = name, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        out.append(LiveSource(name, path))
    return out


def _reader(path: str) -> tuple[IO[bytes], subprocess.Popen[bytes] | None]:
    if path == "-":
        return sys.stdin.buffer, None
    if not shutil.which("ffmpeg"):
        raise ValueError("ffmpeg is needed to stream a media file (or pipe raw PCM into -)")
    proc = subprocess.Popen(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", path, "-ac", "1", "-ar",
         str(SAMPLE_RATE), "-f", "s16le", "-"],
        stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc.stdout, proc


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    """Up to `size` bytes (fewer only at EOF), whatever the pipe hands out per read."""
    parts, got = [], 0
    while got < size:
        data = stream.read(size - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class FrameFeed:
    """Frames of every source, interleaved in time, paced; stops early on `stop`."""

    def __init__(self, sources: list[LiveSource], frame_ms: int, pace: float | None) -> None:
        self.sources = sources
        self.frame_bytes = SAMPLE_RATE * frame_ms // 1000 * BYTES_PER_SAMPLE
        self.pace = pace
        self.stop = threading.Event()
        self.sent_at: dict[str, list[tuple[int, float]]] = {s.name: [] for s in sources}

    def requests(self, config: pb.LiveConfig) -> Iterator[pb.LiveRequest]:
        yield pb.LiveRequest(config=config)
        frames: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=64)
        procs: list[subprocess.Popen[bytes]] = []
        threads = []
        for src in self.sources:
            stream, proc = _reader(src.path)
            if proc is not None:
                procs.append(proc)
            pace = self.pace if self.pace is not None else (0.0 if src.path == "-" else 1.0)
            t = threading.Thread(target=self._pump, args=(src, stream, pace, frames),
                                 daemon=True)
            t.start()
            threads.append(t)
        open_sources = len(self.sources)
        try:
            while open_sources and not self.stop.is_set():
                try:
                    item = frames.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    open_sources -= 1
                    continue
                yield pb.LiveRequest(audio=pb.LiveAudio(source=item[0], data=item[1]))
        finally:
            self.stop.set()
            for proc in procs:
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.wait()

    def _pump(self, src: LiveSource, stream: IO[bytes], pace: float,
              frames: queue.Queue[tuple[str, bytes] | None]) -> None:
        start = time.monotonic()
        sent = 0
        try:
            while not self.stop.is_set():
                data = _read_exact(stream, self.frame_bytes)
                if len(data) % BYTES_PER_SAMPLE:
                    data = data[:-1]  # a torn last sample at EOF
                if not data:
                    break
                if pace > 0:  # real-time pace: frame k leaves when its audio would have
                    delay = start + sent / BYTES_PER_SAMPLE / SAMPLE_RATE / pace - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                sent += len(data)
                self.sent_at[src.name].append((sent // BYTES_PER_SAMPLE, time.monotonic()))
                while not self.stop.is_set():
                    try:
                        frames.put((src.name, data), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        finally:
            frames.put(None)


class LivePrinter:
    """Finals as lines, partials in place on a terminal, status notes on stderr."""

    def __init__(self, out: IO[str], err: IO[str], json_lines: bool, many_sources: bool
                 ) -> None:
        self.out = out
        self.err = err
        self.json = json_lines
        self.tty = out.isatty()
        self.many = many_sources
        self._partial_shown = False

    def _clear(self) -> None:
        if self._partial_shown:
            self.out.write("\r\x1b[K")
            self._partial_shown = False

    def event(self, event: pb.LiveEvent) -> None:
        if self.json:
            print(json_format.MessageToJson(event, indent=None), file=self.out, flush=True)
            return
        kind = event.WhichOneof("event")
        if kind == "partial" and self.tty:
            p = event.partial
            width = shutil.get_terminal_size((100, 20)).columns - 1
            line = f"{self._who(p.source)}… {p.text}"
            if len(line) > width:
                line = "…" + line[-(width - 1):]
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
            self._partial_shown = True
        elif kind == "final":
            f = event.final
            if not f.text:
                return
            self._clear()
            print(f"[{clock(f.start)} --> {clock(f.end)}] {self._who(f.source)}{f.text}",
                  file=self.out, flush=True)
        elif kind == "status":
            s = event.status
            state = pb.LiveSourceState.Name(s.state).removeprefix("LIVE_SOURCE_").lower()
            self._clear()
            print(f"longscribe: source {s.source}: {state} (queue {s.queue_seconds:.1f} s, "
                  f"dropped {s.dropped_seconds:.1f} s){': ' + s.message if s.message else ''}",
                  file=self.err, flush=True)
        elif kind == "started":
            print(f"longscribe: live session {event.started.session_id}"
                  f"{' (resumed)' if event.started.resumed else ''}", file=self.err, flush=True)
        elif kind == "end":
            self._clear()
            e = event.end
            print(f"longscribe: session {e.session_id} ended: {e.finals} finals, "
                  f"{e.dropped_seconds:.1f} s of audio dropped", file=self.err, flush=True)

    def _who(self, source: str) -> str:
        return f"{source}: " if self.many else ""


def open_call(client: LongscribeClient, config: pb.LiveConfig, feed: FrameFeed) -> Any:
    """The TranscribeLive call: iterate it for the events (grpc.RpcError on failure)."""
    return client._stub.TranscribeLive(feed.requests(config), metadata=client._metadata)


def cmd_live(ns: argparse.Namespace, client: LongscribeClient) -> int:
    for path in ns.sources:
        if path != "-" and not os.path.isfile(path):
            print(f"error: {path!r} is not a file (use - for raw PCM on stdin)",
                  file=sys.stderr)
            return 2
    if ns.sources.count("-") > 1:
        print("error: stdin (-) can be only one of the sources", file=sys.stderr)
        return 2
    sources = source_names(ns.sources, ns.name)
    feed = FrameFeed(sources, ns.frame_ms, ns.pace)
    config = pb.LiveConfig(
        sources=[s.name for s in sources], sample_rate=SAMPLE_RATE, encoding="pcm_s16le",
        options=make_options(ns.language, None, ns.prompt), session_id=ns.session or "",
        overflow=ns.overflow, no_partials=ns.no_partials)
    printer = LivePrinter(sys.stdout, sys.stderr, ns.json, len(sources) > 1)
    call = open_call(client, config, feed)
    interrupts = 0

    def on_interrupt(_signum: int, _frame: Any) -> None:
        # a handler, not KeyboardInterrupt: an exception raised inside the call's wait would
        # leave gRPC's receive half-done and the call unusable
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:  # close our side: the server sends the last finals, then end
            feed.stop.set()
            print("\nlongscribe: stopping: waiting for the last finals (Ctrl-C again to quit "
                  "now)", file=sys.stderr, flush=True)
        else:
            call.cancel()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        for event in call:
            printer.event(event)
    except grpc.RpcError as err:
        feed.stop.set()
        if interrupts > 1 and err.code() == grpc.StatusCode.CANCELLED:
            print("longscribe: interrupted", file=sys.stderr)
            return 130
        raise LongscribeError.from_rpc(err, tls=client.tls) from err
    finally:
        signal.signal(signal.SIGINT, previous)
    return 130 if interrupts else 0


def add_parser(sub: Any, conn: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "live", parents=[conn], help="transcribe live audio (files at real-time pace, or stdin)",
        description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a media file, or - for raw PCM s16le 16 kHz mono on stdin")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="the source's name, once per SOURCE in order (default: file stem)")
    p.add_argument("--pace", type=float, default=None,
                   help="send files at this multiple of real time (default 1; 0: as fast as "
                   "possible; stdin goes as it arrives unless set)")
    p.add_argument("--frame-ms", type=int, default=100, help="audio per frame (default 100)")
    p.add_argument("--language", default=os.environ.get("LONGSCRIBE_LANGUAGE"),
                   help="ISO 639-1 code [env LONGSCRIBE_LANGUAGE]")
    p.add_argument("--prompt", help="text to condition the decoder on (names, spelling)")
    p.add_argument("--overflow", choices=("drop_oldest", "reject", "block"),
                   default="drop_oldest", help="what the server does when a source's queue is "
                   "full (default drop_oldest)")
    p.add_argument("--no-partials", action="store_true", help="finals only")
    p.add_argument("--session", metavar="ID", help="resume this session (its id is printed "
                   "at the start)")
    p.add_argument("--json", action="store_true", help="every LiveEvent as a JSON line")
    p.set_defaults(handler=cmd_live)

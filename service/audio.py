"""Decode media to 16 kHz mono float32 as a stream of fixed-size chunks.

`AudioStreamContext` owns one ffmpeg process (and, when it made one, a work directory) for one
job. ffmpeg writes raw s16le PCM to a pipe; we read it incrementally into chunks of at most
`chunk_seconds`, so memory depends on the chunk size, never on the media length. Offsets come
from the cumulative sample count, so chunk k starts exactly where chunk k-1 ended.

Decoding while the file is still being written (`growing=`): the context feeds ffmpeg through
stdin from a tail of the file until the writer sets the event and the file is read to its end.
That works for containers that can be read front to back: mp3, wav, flac, ogg/opus, webm/mkv,
MPEG-TS, ADTS aac, and *fragmented* mp4. A regular mp4/m4a/mov keeps its index (the `moov`
atom) at the end, so ffmpeg cannot decode it from a pipe before the download completes; see
`can_stream_while_growing()`; callers decode those from the finished file instead.
From a pipe ffmpeg cannot trim an mp3's end padding (the encoder delay at the start is trimmed
as usual), so a growing mp3 yields the same samples plus at most one frame (1152 samples) of
near-silence at the end.

pydub is the audio vocabulary: `AudioChunk.to_segment()` gives an `AudioSegment`, and the ffmpeg
/ ffprobe binaries are the ones pydub is configured with (`AudioSegment.converter`).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
from pydub import AudioSegment
from pydub.utils import get_prober_name, which

from .buffers import BufferPool
from .errors import Cancelled, JobError, invalid
from .transcriber import SAMPLE_RATE

log = logging.getLogger(__name__)

_BYTES_PER_SAMPLE = 2  # s16le from ffmpeg
_READ_POLL_SECONDS = 0.1  # how often a blocked read looks at the cancel event
_TAIL_POLL_SECONDS = 0.05  # how often the growing-file feeder looks for new bytes
_FEED_BLOCK = 256 * 1024
_STDERR_LINES = 20
_PIPE_BYTES = 1 << 20

# Containers whose index is at the front or that need none: decodable from a pipe while the
# file is still arriving. mp4-family files need the moov atom, usually written last.
_STREAMABLE_SUFFIXES = {
    ".mp3", ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".webm", ".mkv", ".mka",
    ".ts", ".mts", ".aac", ".adts", ".ac3", ".amr", ".au", ".spx",
}
_NOT_STREAMABLE_SUFFIXES = {".mp4", ".m4a", ".m4b", ".mov", ".3gp", ".3g2", ".m4v"}


def can_stream_while_growing(path_or_name: str | os.PathLike[str]) -> bool:
    """True if a file of this kind can be decoded from a pipe before it is complete.

    By name, and for mp4-family files also by content when the file exists: a fragmented mp4
    (an `mvex` box in the front `moov`, or `moof` fragments) streams, a regular one does not.
    Unknown kinds are assumed not to stream (decode after the download instead).
    """
    path = Path(path_or_name)
    suffix = path.suffix.lower()
    if suffix in _STREAMABLE_SUFFIXES:
        return True
    if suffix in _NOT_STREAMABLE_SUFFIXES and path.is_file():
        return _is_fragmented_mp4(path)
    return False


def _is_fragmented_mp4(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return b"mvex" in head or b"moof" in head


def _grow_pipe(fd: int) -> None:
    # A 1 MiB pipe (Linux) halves the wake-ups per decoded second; the default is 64 KiB.
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsize is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, setsize, _PIPE_BYTES)


def ffmpeg_binary() -> str:
    """The ffmpeg executable pydub is configured with, resolved on PATH."""
    name = AudioSegment.converter
    found = which(name) or (name if os.path.isfile(name) else None)
    if not found:
        raise JobError(grpc.StatusCode.FAILED_PRECONDITION, "ffmpeg is not installed on the server")
    return found


def ffprobe_binary() -> str | None:
    name = get_prober_name()
    return which(name) or None


def probe_duration(path: str | os.PathLike[str], timeout: float = 30.0) -> float | None:
    """Media duration in seconds from ffprobe's container header; None if unknown."""
    prober = ffprobe_binary()
    if prober is None:
        return None
    cmd = [prober, "-v", "error", "-show_entries", "format=duration",
           "-of", "default=noprint_wrappers=1:nokey=1", os.fspath(path)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        value = float(out.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None
    return value if value > 0 else None


def adaptive_chunk_seconds(
    cap: float,
    *,
    available_bytes: int | None = None,
    chunks_in_flight: int = 16,
    memory_fraction: float = 0.05,
    min_seconds: float = 1.0,
) -> float:
    """Chunk duration for the memory we have: at most `cap`, and small enough that
    `chunks_in_flight` chunks (queue + pool + consumer) use at most `memory_fraction` of the
    available memory (psutil's `available` unless given). Never below `min_seconds`."""
    if available_bytes is None:
        available_bytes = psutil.virtual_memory().available
    # float32 samples plus the s16 read buffer per sample.
    bytes_per_second = SAMPLE_RATE * (4 + _BYTES_PER_SAMPLE)
    fits = available_bytes * memory_fraction / (chunks_in_flight * bytes_per_second)
    return max(min_seconds, min(cap, fits))


@dataclass(eq=False)
class AudioChunk:
    """`samples` (float32, 16 kHz mono, in [-1, 1)) starting at absolute sample `start_sample`.

    With a buffer pool, `samples` is a view of a pooled buffer: call `release()` (or use the
    chunk as a context manager) when done; see `longscribe.service.buffers` for the rule.
    The queue fills `enqueued_at`/`dequeued_at` (time.monotonic()).
    """

    index: int
    start_sample: int
    samples: np.ndarray
    enqueued_at: float | None = None
    dequeued_at: float | None = None
    _pool: BufferPool | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def end_sample(self) -> int:
        return self.start_sample + self.num_samples

    @property
    def start(self) -> float:
        return self.start_sample / SAMPLE_RATE

    @property
    def end(self) -> float:
        return self.end_sample / SAMPLE_RATE

    @property
    def duration(self) -> float:
        return self.num_samples / SAMPLE_RATE

    @property
    def nbytes(self) -> int:
        return int(self.samples.nbytes)

    def to_segment(self) -> AudioSegment:
        pcm = np.clip(np.rint(self.samples * 32768.0), -32768, 32767).astype("<i2")
        return AudioSegment(pcm.tobytes(), sample_width=2, frame_rate=SAMPLE_RATE, channels=1)

    def release(self) -> None:
        """Give a pooled buffer back; `samples` is empty afterwards."""
        self.samples = np.empty(0, dtype=np.float32)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.release()

    def __enter__(self) -> AudioChunk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AudioStreamContext:
    """Context manager: decode `source` with ffmpeg and yield `AudioChunk`s from `.chunks()`.

    - `chunk_seconds`: the cap on a chunk's duration; the real size is
      `adaptive_chunk_seconds(chunk_seconds)` (and at most a pool buffer when `buffer_pool`).
    - `work_dir`: ffmpeg's working folder; one the context makes (a temp dir when not given,
      or the given path when it did not exist) is removed on exit; an existing one is kept.
    - `cancel`: a threading.Event; checked between reads, raises `errors.Cancelled`.
    - `growing`: a threading.Event the writer sets when `source` is complete; until then the
      file is tailed and piped to ffmpeg (only for containers `can_stream_while_growing`).
    - `buffer_pool`: chunk samples come from this pool (see `buffers` for ownership).

    Bad input raises `JobError(INVALID_ARGUMENT)`. Exit, however it happens, kills ffmpeg
    (terminate, then kill), reaps it, closes the pipes and removes a work_dir it created.
    Counters: `bytes_in` (bytes fed from a growing file), `samples_out`, `seconds_decoded`.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        chunk_seconds: float = 30.0,
        work_dir: str | os.PathLike[str] | None = None,
        cancel: threading.Event | None = None,
        growing: threading.Event | None = None,
        buffer_pool: BufferPool | None = None,
    ) -> None:
        self.source = Path(source)
        self.cancel = cancel or threading.Event()
        self.growing = growing
        self.buffer_pool = buffer_pool
        self.chunk_seconds = adaptive_chunk_seconds(chunk_seconds)
        samples = max(1, round(self.chunk_seconds * SAMPLE_RATE))
        if buffer_pool is not None:
            samples = min(samples, buffer_pool.buffer_samples)
        self.chunk_samples = samples
        self.work_dir: Path | None = Path(work_dir) if work_dir is not None else None
        self._owns_work_dir = False
        self.bytes_in = 0
        self.samples_out = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()  # tells helper threads to quit
        self._feed_error: BaseException | None = None
        self._started = False

    @property
    def seconds_decoded(self) -> float:
        return self.samples_out / SAMPLE_RATE

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> AudioStreamContext:
        try:
            self._open()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _open(self) -> None:
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="longscribe-audio-"))
            self._owns_work_dir = True
        elif not self.work_dir.is_dir():
            self.work_dir.mkdir(parents=True)
            self._owns_work_dir = True  # we made it, so it goes with us
        if self.growing is None:
            if not self.source.is_file():
                raise JobError(grpc.StatusCode.NOT_FOUND, f"media file not found: {self.source}")
            if self.source.stat().st_size == 0:
                raise invalid(f"the media file is empty: {self.source.name}")
        # An absolute path can never be read as a protocol ("concat:", "http:"), and the
        # whitelist stops playlists inside "media" (HLS, ffconcat) from reaching the network.
        source = "pipe:0" if self.growing is not None else os.fspath(self.source.absolute())
        cmd = [ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error",
               "-protocol_whitelist", "file,pipe", "-i", source,
               "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(SAMPLE_RATE),
               "-f", "s16le", "pipe:1"]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if self.growing is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.work_dir,
        )
        assert self._proc.stdout is not None
        _grow_pipe(self._proc.stdout.fileno())
        if self._proc.stdin is not None:
            _grow_pipe(self._proc.stdin.fileno())
        self._start_thread(self._drain_stderr, "ffmpeg-stderr")
        if self.growing is not None:
            self._start_thread(self._feed_growing, "ffmpeg-feed")
        self._started = True

    def _start_thread(self, target: object, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _close(self) -> None:
        self._stop.set()
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads.clear()
        if self._owns_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self._owns_work_dir = False

    # -- helper threads ----------------------------------------------------------------------

    def _drain_stderr(self) -> None:
        # Read every line so ffmpeg can never block on a full stderr pipe; keep only the last.
        proc = self._proc
        assert proc is not None and proc.stderr is not None
        try:
            for raw in iter(proc.stderr.readline, b""):
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    self._stderr_tail.append(line)
        except (OSError, ValueError):
            pass  # pipe closed by _close

    def _feed_growing(self) -> None:
        """Tail `source` into ffmpeg's stdin until the writer is done and the file is read."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and self.growing is not None
        try:
            f = None
            while f is None:
                try:
                    f = self.source.open("rb")
                except FileNotFoundError:
                    if self.growing.is_set() or self._stop.is_set() or self.cancel.is_set():
                        self._feed_error = JobError(
                            grpc.StatusCode.NOT_FOUND, f"media file not found: {self.source}")
                        return
                    time.sleep(_TAIL_POLL_SECONDS)
            with f:
                while not self._stop.is_set() and not self.cancel.is_set():
                    # Look at the event before reading, so a read that comes back empty after
                    # the writer finished really means end of file.
                    done = self.growing.is_set()
                    block = f.read(_FEED_BLOCK)
                    if block:
                        proc.stdin.write(block)
                        self.bytes_in += len(block)
                    elif done:
                        break
                    else:
                        time.sleep(_TAIL_POLL_SECONDS)
        except (BrokenPipeError, ValueError, OSError) as e:
            # ffmpeg exited (bad data) or we are closing; the reader reports the cause.
            log.debug("growing-file feeder stopped: %s", e)
        finally:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()

    # -- decoding ----------------------------------------------------------------------------

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("decoding was cancelled")

    def _read_into(self, fd: int, buf: memoryview) -> int:
        """Fill `buf` from `fd`; return bytes read (less than asked only at end of stream)."""
        filled = 0
        size = len(buf)
        # poll, not select: a busy server can hold file descriptors above select's 1024 limit.
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while filled < size:
            self._check_cancel()
            if not poller.poll(_READ_POLL_SECONDS * 1000):
                continue
            n = os.readv(fd, [buf[filled:]])
            if n == 0:
                break
            filled += n
        return filled

    def chunks(self) -> Iterator[AudioChunk]:
        """Yield chunks in order until ffmpeg's output ends; raise JobError if it failed."""
        if not self._started or self._proc is None or self._proc.stdout is None:
            raise RuntimeError("use AudioStreamContext as a context manager before chunks()")
        proc = self._proc
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        raw = bytearray(self.chunk_samples * _BYTES_PER_SAMPLE)
        view = memoryview(raw)
        index = 0
        leftover = 0  # an odd trailing byte is impossible from s16le, but stay exact if so
        while True:
            got = self._read_into(fd, view[leftover:]) + leftover
            n = got // _BYTES_PER_SAMPLE
            if n:
                yield self._make_chunk(index, raw, n)
                index += 1
            if got < len(raw):
                break
            leftover = got - n * _BYTES_PER_SAMPLE
            if leftover:
                raw[:leftover] = raw[n * _BYTES_PER_SAMPLE:got]
        self._finish(proc)

    def _make_chunk(self, index: int, raw: bytearray, n: int) -> AudioChunk:
        pcm = np.frombuffer(raw, dtype="<i2", count=n)
        if self.buffer_pool is not None:
            buf = self.buffer_pool.acquire()
            out = buf[:n]
        else:
            out = np.empty(n, dtype=np.float32)
        out[:] = pcm  # int16 -> float32 in place, no temporary array
        out *= np.float32(1.0 / 32768.0)
        chunk = AudioChunk(index, self.samples_out, out, _pool=self.buffer_pool)
        self.samples_out += n
        return chunk

    def _finish(self, proc: subprocess.Popen[bytes]) -> None:
        self._check_cancel()
        try:
            rc = proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            rc = None
        for t in self._threads:  # let the stderr reader catch the last lines
            t.join(timeout=2.0)
        if self._feed_error is not None:
            raise self._feed_error
        last = self._stderr_tail[-1] if self._stderr_tail else "no error output"
        if rc is None or rc != 0:
            if any("matches no streams" in line for line in self._stderr_tail):
                raise invalid(f"no audio stream in {self.source.name}")
            if self.growing is not None and self.bytes_in == 0:
                raise invalid(f"the media file is empty: {self.source.name}")
            if self.samples_out:
                raise invalid(
                    f"ffmpeg failed after {self.seconds_decoded:.1f} s of audio in "
                    f"{self.source.name}: {last}")
            raise invalid(f"not a media file ffmpeg can decode: {last}")
        if self.samples_out == 0:
            raise invalid(f"no audio in {self.source.name} (ffmpeg decoded 0 samples)")


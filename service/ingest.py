"""Decode a job's media ahead of its consumer, through one bounded queue.

`ChunkStream` runs `AudioStreamContext` in a producer thread that puts chunks into an
`AudioChunkQueue` (policy BLOCK, bounded by bytes = `max_queue_seconds` of float32 audio). When
the consumer (segmenter and engine) falls behind, `put` blocks, the producer stops reading
ffmpeg's stdout, the pipe fills and ffmpeg blocks in its write: backpressure reaches the decoder
(and, for a growing file, the tail reader). Decoded audio held at once is at most the queue's
bound plus one chunk in the producer's hand, whatever the media length.

The consumer iterates `chunks()` (from any thread: in the server it is the engine's feeder
thread, while `__exit__` runs in the pipeline's thread). A producer error (JobError, Cancelled,
anything) is re-raised in the consumer after the chunks decoded before it. `cancel` makes both
sides stop within ~0.1 s. Exit, however it happens, stops the producer, kills and reaps ffmpeg,
joins the thread, flushes and closes the queue and removes the queue's per-job gauge series.

Metrics (`metrics.Metrics`, the process-wide one by default): longscribe_queue_depth/bytes with
queue="decode:<job id[:8]>" while the stream lives; chunk waits and drops under queue="decode";
longscribe_audio_decoded_seconds_total; with `received_source`, the media bytes read into
longscribe_audio_bytes_received_total{source}.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .audio import SAMPLE_RATE, AudioChunk, AudioStreamContext
from .chunk_queue import AudioChunkQueue, OverflowPolicy, QueueClosed, QueueEmpty
from .errors import Cancelled
from .metrics import Metrics, QueueMetricsObserver, default

log = logging.getLogger(__name__)

QUEUE_GROUP = "decode"  # the stable label for waits and drops of every job's decode queue
_CHUNK_BYTES_PER_SECOND = SAMPLE_RATE * 4  # float32 samples in a chunk
_POLL_SECONDS = 0.05  # how often a waiting side looks at cancel / close
_JOIN_SECONDS = 15.0  # AudioStreamContext's own exit may take ~7 s (terminate, kill, joins)


class _AnyEvent(threading.Event):
    """Reads as set when any of `events` is set: AudioStreamContext polls `cancel.is_set()`,
    so the producer stops on the job's cancel *or* on the stream closing, with no watcher
    thread. Only `is_set` is meaningful; never `set()` or `wait()` it."""

    def __init__(self, *events: threading.Event) -> None:
        super().__init__()
        self._events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


class ChunkStream:
    """Context manager; see the module docstring.

    - `source`, `work_dir`, `growing`, `chunk_seconds`: as for `AudioStreamContext`
      (`chunk_seconds` is also capped at half the queue, so decoding overlaps consumption).
    - `cancel`: the job's event; `chunks()` raises `Cancelled` within `_POLL_SECONDS` of it.
    - `job_id`: names the queue `decode:<job_id[:8]>` (logs and the depth/bytes series).
    - `max_queue_seconds`: the queue's bound in seconds of decoded audio (bytes of float32).
    - `received_source`: count the media bytes ffmpeg reads as received from that source
      ("download"); leave None when someone else counted them (uploads are counted by the API).
    - `warn_after`: seconds the queue may stay full before a warning line; a full queue is the
      normal state of a batch job whose engine is slower than ffmpeg, so only long stalls log.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        job_id: str,
        work_dir: str | os.PathLike[str] | None = None,
        cancel: threading.Event | None = None,
        chunk_seconds: float = 30.0,
        max_queue_seconds: float = 120.0,
        growing: threading.Event | None = None,
        metrics: Metrics | None = None,
        received_source: str | None = None,
        warn_after: float = 300.0,
    ) -> None:
        if max_queue_seconds <= 0:
            raise ValueError("max_queue_seconds must be positive")
        self.source = Path(source)
        self.cancel = cancel or threading.Event()
        self.growing = growing
        self.metrics = metrics or default()
        self.received_source = received_source
        self.name = f"{QUEUE_GROUP}:{job_id[:8]}"
        self._closing = threading.Event()
        self._ctx = AudioStreamContext(
            source,
            chunk_seconds=min(chunk_seconds, max_queue_seconds / 2),
            work_dir=work_dir,
            cancel=_AnyEvent(self.cancel, self._closing),
            growing=growing,
        )
        self.max_bytes = round(max_queue_seconds * _CHUNK_BYTES_PER_SECOND)
        chunk_bytes = self._ctx.chunk_samples * 4
        self.observer = QueueMetricsObserver(self.metrics, group=QUEUE_GROUP)
        # Bytes are the real bound; the item bound equals it for full-size chunks, so the
        # queue's "stayed full" warning can fire.
        self.queue: AudioChunkQueue[AudioChunk] = AudioChunkQueue(
            max(1, self.max_bytes // chunk_bytes),
            OverflowPolicy.BLOCK,
            max_bytes=self.max_bytes,
            name=self.name,
            observer=self.observer,
            warn_after=warn_after,
        )
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._complete = False  # the producer saw the media's end (not a close or an error)
        self._bytes_counted = 0
        self._closed = False
        self.blocked_seconds = 0.0  # the producer's total wait for room (backpressure)

    # -- state ---------------------------------------------------------------------------------

    @property
    def chunk_samples(self) -> int:
        return self._ctx.chunk_samples

    @property
    def samples_decoded(self) -> int:
        """Samples the producer has read from ffmpeg (queued, handed out, or in its hand)."""
        return self._ctx.samples_out

    @property
    def ffmpeg_pid(self) -> int | None:
        return self._ctx.pid

    @property
    def work_dir(self) -> Path | None:
        return self._ctx.work_dir

    @property
    def producer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join_producer(self, timeout: float | None = None) -> bool:
        """Wait for the producer thread to end; True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.producer_alive

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> ChunkStream:
        # Opened here, not in the thread, so a missing file or a missing ffmpeg raises from
        # `with` exactly as AudioStreamContext does; the producer thread closes it.
        self._ctx.__enter__()
        try:
            if self.received_source and self.growing is None:
                self._count_received(self.source.stat().st_size)
            self._thread = threading.Thread(
                target=self._produce, name=f"ingest-{self.name}", daemon=True)
            self._thread.start()
        except BaseException:
            self._thread = None
            self._ctx.__exit__(None, None, None)
            self._finish()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the producer and ffmpeg, join, flush; idempotent, callable from any thread."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()  # the producer's decode loop and chunks() both watch this
        self.queue.close()  # a producer blocked in put() wakes with QueueClosed
        if self._thread is not None:
            self._thread.join(_JOIN_SECONDS)
            if self._thread.is_alive():
                log.error("decode producer of %s did not stop within %.0f s", self.name,
                          _JOIN_SECONDS)
        self._finish()

    def _finish(self) -> None:
        # Chunks nobody will take: counted as dropped (reason says why), then the per-job
        # gauges go, so finished jobs leave no series behind.
        self.queue.close()
        self.queue.flush(reason="cancelled" if self.cancel.is_set() else "closed")
        self.observer.forget(self.name)

    # -- producer ------------------------------------------------------------------------------

    def _produce(self) -> None:
        ctx = self._ctx
        chunks = ctx.chunks()
        interrupted = False  # stopped mid-read or mid-put: ffmpeg is running and not yet reaped
        try:
            for chunk in chunks:
                self.metrics.add_decoded_audio(chunk.duration)
                self._count_growing_bytes()
                self._put(chunk)
                del chunk  # hold nothing while blocked in the next read
            self._count_growing_bytes()
            self._complete = True
        except QueueClosed:
            interrupted = True  # the stream was closed: nobody is left to report to
        except Cancelled as e:
            interrupted = True
            self._error = e
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._error = e
        finally:
            chunks.close()
            if interrupted:
                self._kill_ffmpeg()
            try:
                ctx.__exit__(None, None, None)  # ffmpeg is reaped before the consumer sees the end
            except BaseException as e:  # noqa: BLE001
                self._error = self._error or e
            self.queue.close()

    def _kill_ffmpeg(self) -> None:
        # AudioStreamContext's exit sends SIGTERM and waits up to 2 s; an ffmpeg blocked on
        # the full pipe (the normal state under backpressure) answers SIGTERM by flushing into
        # that pipe, so it would sit out the whole 2 s. Its output is unwanted now: SIGKILL.
        # Only called while ffmpeg is our unreaped child, so the pid cannot have been reused.
        pid = self._ctx.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _put(self, chunk: AudioChunk) -> None:
        started = time.monotonic()
        # A timed put, so cancel stops a producer that is waiting for room.
        while not self.queue.put(chunk, timeout=_POLL_SECONDS):
            if self.cancel.is_set() or self._closing.is_set():
                raise Cancelled("decoding was cancelled")
        self.blocked_seconds += time.monotonic() - started

    def _count_growing_bytes(self) -> None:
        if self.received_source and self.growing is not None:
            self._count_received(self._ctx.bytes_in - self._bytes_counted)

    def _count_received(self, n: int) -> None:
        assert self.received_source is not None
        self.metrics.add_audio_bytes(n, source=self.received_source)
        self._bytes_counted += max(n, 0)

    # -- consumer ------------------------------------------------------------------------------

    def chunks(self) -> Iterator[AudioChunk]:
        """Chunks in order until the media ends; the producer's error, if any, after them."""
        if self._thread is None:
            raise RuntimeError("use ChunkStream as a context manager before chunks()")
        return self._consume()

    def _consume(self) -> Iterator[AudioChunk]:
        while True:
            # Checked before every get, so a cancel does not wait for the queued backlog.
            if self.cancel.is_set():
                raise Cancelled("decoding was cancelled")
            if self._closing.is_set():
                raise Cancelled("the audio stream was closed")
            try:
                chunk = self.queue.get(timeout=_POLL_SECONDS)
            except QueueEmpty:
                continue
            except QueueClosed:
                if self._error is not None:
                    raise self._error from None
                if self._complete:
                    return
                # Closed under us (close() from another thread): never pass for a full stream.
                raise Cancelled("the audio stream was closed") from None
            yield chunk

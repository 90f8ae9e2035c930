"""One job's work, start to end: source → fetch → decode → segment → engine → results.

Plain Python, no gRPC: the job manager hands in a JobContext with callbacks for progress,
segments and durable updates, and gets back the final Result (or a JobError / Cancelled)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from longscribe.service import formats, metrics
from longscribe.service.audio import can_stream_while_growing, probe_duration
from longscribe.service.errors import Cancelled, JobError, exhausted
from longscribe.service.fetch import DownloadHandle, FetchProgress, start_download
from longscribe.service.ingest import ChunkStream
from longscribe.service.paths import resolve_media_path
from longscribe.service.segment import Segmenter, Window
from longscribe.service.store import JobRow, JobStore, StoredWindow
from longscribe.service.transcriber import SAMPLE_RATE, DecodeOptions, WindowResult
from longscribe.v1 import transcription_pb2 as pb

log = logging.getLogger(__name__)

# Share of the whole job's percent given to downloading, when there is a download.
DOWNLOAD_SHARE = 20.0


@dataclass
class JobContext:
    row: JobRow
    config: Any
    engine: Any
    store: JobStore
    job_dir: Path
    tmp_dir: Path
    cancel: Any  # threading.Event
    set_phase: Callable[..., None]  # a phase change (always recorded)
    progress: Callable[..., None]  # progress within a phase (rate-limited)
    window_done: Callable[[StoredWindow], None]  # stores a window and its segment events
    update: Callable[..., None]  # durable job fields (media_path, duration, chunk counts)
    download_fraction: float = 0.0  # share of a URL's bytes downloaded so far
    decoded_seconds: float = 0.0  # audio ffmpeg actually decoded

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()


def run_pipeline(ctx: JobContext) -> pb.Result:
    ctx.check_cancelled()
    if ctx.row.source_kind == "live":
        # a live session left open by a server that stopped: its stream is gone, so its job
        # ends with the finals it stored (service/live/job.py)
        from longscribe.service.live.job import stored_result

        return stored_result(ctx.store, ctx.row.job_id, ctx.row.options.language or "en")
    base = DOWNLOAD_SHARE if ctx.row.source_kind == "url" else 0.0
    media, handle = _obtain_media(ctx)
    if handle is None:
        duration = _checked_duration(ctx, media)
        segments, language = _transcribe(ctx, media, duration, base)
    else:
        segments, language, duration = _transcribe_while_downloading(ctx, handle, base)
    if 0 < ctx.decoded_seconds < duration - 0.5:
        # a truncated file: its header promises more than ffmpeg could decode
        log.warning("job %s: the media header says %.1f s, %.1f s decoded", ctx.row.job_id,
                    duration, ctx.decoded_seconds)
        duration = ctx.decoded_seconds
        ctx.update(duration=duration)
    ctx.set_phase(pb.JOB_STATE_FINALIZING, percent=99.0, audio_seconds_done=duration,
                  audio_seconds_total=duration, message="rendering formats")
    # Segment texts may or may not carry whisper's leading space: join on words, not bytes.
    text = " ".join(t for t in (s.text.strip() for s in segments) if t)
    return pb.Result(
        text=text,
        segments=segments,
        language=language,
        duration_seconds=duration,
        formats=formats.all_formats(text, segments, language),
    )


def _checked_duration(ctx: JobContext, media: Path) -> float:
    duration = probe_duration(media) or 0.0
    _check_duration_limit(ctx, duration)
    ctx.update(duration=duration)
    return duration


def _check_duration_limit(ctx: JobContext, seconds: float) -> None:
    limit = ctx.config.max_duration_seconds
    if seconds > limit:
        raise exhausted(
            f"the media lasts {seconds / 60:.1f} min or more, over this server's limit of "
            f"{limit / 60:.1f} min (max_duration_seconds)"
        )


def _obtain_media(ctx: JobContext) -> tuple[Path, DownloadHandle | None]:
    """The media file on local disk. For a download whose container can be decoded while it
    grows (mp3, wav, ogg, webm, fragmented mp4; not mp4/m4a with the index at the end), the
    file still being written and its download handle."""
    row = ctx.row
    if row.source_kind == "path":
        return resolve_media_path(ctx.config.media_root, row.source), None
    if row.media_path and Path(row.media_path).is_file():
        return Path(row.media_path), None  # uploaded, or downloaded before a restart
    if row.source_kind != "url":
        raise JobError(grpc.StatusCode.DATA_LOSS,
                       "the uploaded file is gone (the server lost it); upload it again")
    ctx.set_phase(pb.JOB_STATE_DOWNLOADING, percent=0.0, message=f"downloading {row.source}")

    def on_progress(p: FetchProgress) -> None:
        # While decoding runs on the growing file, download progress belongs to that phase.
        phase = row.state if row.state in _STREAMING_PHASES else pb.JOB_STATE_DOWNLOADING
        ctx.download_fraction = p.fraction or 0.0
        ctx.progress(phase, percent=DOWNLOAD_SHARE * (p.fraction or 0.0),
                     bytes_done=p.downloaded_bytes, bytes_total=p.total_bytes or 0,
                     bytes_per_second=p.speed or 0.0, eta_seconds=p.eta or 0.0)

    handle = start_download(
        row.source,
        ctx.job_dir / "download",
        on_progress=on_progress,
        cancel=ctx.cancel,
        max_bytes=ctx.config.max_upload_bytes,
        allow_private_networks=ctx.config.allow_private_networks,
        min_free_bytes=ctx.config.min_free_disk_bytes,
    )
    handle.file_ready.wait()
    partial = handle.partial_path
    if partial is not None and not handle.finished.is_set() and can_stream_while_growing(partial):
        return partial, handle
    return _downloaded(ctx, handle), None


_STREAMING_PHASES = (pb.JOB_STATE_DECODING, pb.JOB_STATE_TRANSCRIBING)


def _downloaded(ctx: JobContext, handle: DownloadHandle) -> Path:
    """Wait for the download's end; record the file so a restarted job does not fetch again."""
    path = handle.result()
    size = path.stat().st_size
    ctx.update(media_path=str(path))
    ctx.progress(ctx.row.state, percent=DOWNLOAD_SHARE, bytes_done=size, bytes_total=size,
                 force=True)
    return path


def _transcribe_while_downloading(ctx: JobContext, handle: DownloadHandle, base: float
                                  ) -> tuple[list[pb.Segment], str, float]:
    assert handle.partial_path is not None
    try:
        segments, language = _transcribe(ctx, handle.partial_path, 0.0, base,
                                         growing=handle.finished)
    except JobError as exc:
        if isinstance(exc, Cancelled):
            raise
        # A decode error on a half-written file is often the download's fault: say which.
        handle.cancel()
        try:
            handle.result()
        except JobError as download_error:
            if not isinstance(download_error, Cancelled):
                raise download_error from exc
        raise
    # Always ask: a download that broke off looks like a normal end of file to ffmpeg.
    path = _downloaded(ctx, handle)
    duration = _checked_duration(ctx, path)
    if handle.restarted.is_set():
        # The server ignored a Range retry: what was decoded came from an abandoned file.
        log.warning("job %s: download restarted; transcribing the final file again",
                    ctx.row.job_id)
        ctx.store.delete_windows(ctx.row.job_id)
        segments, language = _transcribe(ctx, path, duration, base)
    return segments, language, duration


def check_model_options(options: pb.TranscriptionOptions, multilingual: bool) -> None:
    """What an English-only model cannot do is refused, not silently ignored."""
    if multilingual:
        return
    if options.task == "translate":
        raise JobError(grpc.StatusCode.INVALID_ARGUMENT,
                       "task 'translate' needs a multilingual model; this server runs an "
                       "English-only one")
    if options.language and options.language.lower() not in ("en", "english"):
        raise JobError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"language {options.language[:40]!r}: this server runs an English-only "
                       "model; leave the language empty or use 'en'")


def decode_options(options: pb.TranscriptionOptions, multilingual: bool) -> DecodeOptions:
    check_model_options(options, multilingual)
    language = options.language or (None if multilingual else "en")
    return DecodeOptions(
        language=language,
        task=options.task or "transcribe",
        initial_prompt=options.initial_prompt or None,
    )


def _transcribe(ctx: JobContext, media: Path, duration: float, base: float,
                growing: threading.Event | None = None) -> tuple[list[pb.Segment], str]:
    """Decode, segment and transcribe `media`; `growing`: the file is still being written
    until this event is set (duration then unknown until it is)."""
    stored = ctx.store.load_windows(ctx.row.job_id)
    ctx.set_phase(pb.JOB_STATE_DECODING, percent=base, audio_seconds_total=duration,
                  message="decoding audio")
    options = decode_options(ctx.row.options, ctx.engine.is_multilingual)
    segments: list[pb.Segment] = []
    language = options.language or ""
    done_windows = reused = 0
    started = time.monotonic()
    transcribing = False

    reached = 0.0  # audio position of the last progress event

    def report(position: float, windows_done: int, message: str = "") -> None:
        """A progress event at this audio position (a finished window's end, or the engine's
        estimate inside a running batch); also called from the engine's worker thread."""
        nonlocal reached
        reached = max(reached, position)
        total = duration or (handle_total() if growing is not None else 0.0)
        done = min(reached, total) if total else reached
        elapsed = max(time.monotonic() - started, 1e-6)
        rtf = done / elapsed
        metrics.set_realtime_factor(rtf)
        ctx.progress(
            pb.JOB_STATE_TRANSCRIBING,
            percent=base + ((99.0 - base) * done / total if total else 0.0),
            audio_seconds_done=done,
            audio_seconds_total=total,
            chunk_index=windows_done,
            realtime_factor=rtf,
            eta_seconds=max(total - done, 0.0) / rtf if rtf > 0 and total else 0.0,
            # an engine's wait is always recorded; a step down under load rides along
            message=message or getattr(ctx.engine, "degradation_message", ""),
            **({"force": True} if message else {}),
        )

    def handle_total() -> float:
        # decoding while downloading: probed once the download is complete, estimated before
        return ctx.row.duration or total_from_download()

    # ChunkStream decodes ahead of the engine through one bounded queue: memory stays flat
    # whatever the media length, and a slow engine throttles ffmpeg.
    with ChunkStream(media, job_id=ctx.row.job_id, work_dir=ctx.tmp_dir, cancel=ctx.cancel,
                     growing=growing, received_source="download" if base else None) as stream:
        windows = Segmenter(method=ctx.config.vad).windows(stream.chunks())
        total_from_download = _length_estimate(ctx, stream)

        def in_batch(position: float, message: str = "") -> None:
            report(position, done_windows, message)

        for done, was_stored in _merge_stored(windows, stored, ctx, options, in_batch):
            if not transcribing:
                transcribing = True
                ctx.set_phase(pb.JOB_STATE_TRANSCRIBING, percent=base,
                              audio_seconds_total=duration, message="transcribing")
            window_segments = []
            for seg in done.segments:
                message = pb.Segment()
                message.CopyFrom(seg)
                message.id = len(segments)  # ids follow window order, so a resume keeps them
                segments.append(message)
                window_segments.append(message)
            if was_stored:
                reused += 1  # its segment events are in the job's log already
            else:
                ctx.window_done(StoredWindow(done.index, done.start, done.end, window_segments))
            language = language or done.language
            done_windows += 1
            ctx.update(chunks_done=done_windows, chunks_reused=reused)
            report(done.end, done_windows)
        ctx.decoded_seconds = stream.samples_decoded / SAMPLE_RATE
    ctx.update(chunks_total=done_windows)
    if reused:
        log.info("job %s reused %d stored windows", ctx.row.job_id, reused)
    return segments, language or "en"


@dataclass(frozen=True)
class _DoneWindow:
    index: int
    start: float  # the window's bounds, in seconds
    end: float
    segments: list[pb.Segment]
    language: str = ""


def _length_estimate(ctx: JobContext, stream: ChunkStream) -> Callable[[], float]:
    """The media length while it is still downloading: audio decoded so far over the share of
    the file downloaded (0 while that share is unknown or small)."""
    def estimate() -> float:
        fraction = ctx.download_fraction
        if fraction < 0.05:
            return 0.0
        return stream.samples_decoded / SAMPLE_RATE / fraction
    return estimate


def _merge_stored(windows: Iterator[Window], stored: dict[int, StoredWindow], ctx: JobContext,
                  options: DecodeOptions, progress: Callable[[float], None] | None = None,
                  ) -> Iterator[tuple[_DoneWindow, bool]]:
    """Finished windows in window order, and whether each came from the store. A stored window
    is reused only when the new cut has the same bounds, so a changed segmenter (a new version
    after a restart) decodes again instead of leaving gaps or overlaps."""
    lock = threading.Lock()
    reusable: dict[int, StoredWindow] = {}
    bounds: dict[int, tuple[float, float]] = {}

    def route() -> Iterator[Window]:  # runs on the engine's feeder thread
        for window in windows:
            old = stored.get(window.index)
            with lock:
                if old is not None and _same_bounds(old, window):
                    reusable[window.index] = old
                    continue
                bounds[window.index] = (window.start, window.end)
            yield window

    def reused_before(index: int | None) -> list[StoredWindow]:
        # Every window before `index` went through route() before window `index` did.
        with lock:
            ready = sorted(i for i in reusable if index is None or i < index)
            return [reusable.pop(i) for i in ready]

    for result in ctx.engine.transcribe(route(), options, ctx.cancel, progress=progress):
        for old in reused_before(result.index):
            yield _DoneWindow(old.index, old.start, old.end, old.segments), True
        with lock:
            start, end = bounds.pop(result.index)
        yield _DoneWindow(result.index, start, end, _to_pb_segments(result),
                          getattr(result, "language", "") or ""), False
    for old in reused_before(None):
        yield _DoneWindow(old.index, old.start, old.end, old.segments), True
    ctx.check_cancelled()


def _same_bounds(old: StoredWindow, window: Window) -> bool:
    return abs(old.start - window.start) < 1e-4 and abs(old.end - window.end) < 1e-4


def _to_pb_segments(result: WindowResult) -> list[pb.Segment]:
    return [
        pb.Segment(start=s.start, end=s.end, text=s.text, avg_logprob=s.avg_logprob,
                   no_speech_prob=s.no_speech_prob, compression_ratio=s.compression_ratio,
                   temperature=s.temperature,
                   words=[pb.Word(word=w.word, start=w.start, end=w.end,
                                  probability=w.probability) for w in s.words])
        for s in result.segments
    ]

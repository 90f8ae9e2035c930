"""Progress display for a job: tqdm bars on a terminal, plain log lines elsewhere.

Two bars at most: bytes (upload or download) and audio seconds transcribed. The server's phase
(queued, downloading, decoding, transcribing, finalizing) is the bar's description. When stderr
is not a terminal, `auto` writes an occasional plain line instead of carriage-return noise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from longscribe.v1 import transcription_pb2 as pb
from tqdm import tqdm

MODES = ("auto", "bars", "log", "off")

_AUDIO_PHASES = frozenset(
    {pb.JOB_STATE_DECODING, pb.JOB_STATE_TRANSCRIBING, pb.JOB_STATE_FINALIZING}
)
_AUDIO_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}{postfix}]"
_AUDIO_FORMAT_NO_TOTAL = "{desc}: {n:.0f} s audio [{elapsed}{postfix}]"


def phase_label(state: int) -> str:
    """The phase as a word: transcribing for JOB_STATE_TRANSCRIBING."""
    try:
        return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()
    except ValueError:
        return "working"


def speed_text(progress: pb.Progress) -> str:
    """Speed and ETA, e.g. `×35.0 real time, ETA 00:14` (empty when the event has neither)."""
    parts = []
    if progress.realtime_factor > 0:
        parts.append(f"×{progress.realtime_factor:.1f} real time")
    if progress.eta_seconds > 0:
        parts.append(f"ETA {tqdm.format_interval(progress.eta_seconds)}")
    return ", ".join(parts)


def _size(n: float) -> str:
    return tqdm.format_sizeof(n, "B", 1024)


class ProgressView:
    """Renders nothing: the quiet mode, and the interface of the others. Use as a context
    manager so bars are closed whatever happens."""

    def on_upload(self, done: int, total: int) -> None:
        """Bytes sent so far (called from the upload's sending thread)."""

    def on_event(self, event: pb.JobEvent) -> None:
        """One of the job's events, in order."""

    def message(self, text: str) -> None:
        """A one-off line for the user (e.g. the job id), printed without breaking a bar."""

    def close(self) -> None:
        """Finish the display (idempotent)."""

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BarProgress(ProgressView):
    """tqdm bars: one for bytes moved, one for audio transcribed."""

    def __init__(self, file: TextIO, *, mininterval: float = 0.1) -> None:
        self._file = file
        self._mininterval = mininterval  # tqdm's redraw rate limit
        self._bytes: tqdm | None = None
        self._audio: tqdm | None = None

    def _bytes_bar(self, desc: str, total: int) -> tqdm:
        if self._bytes is None:
            self._bytes = tqdm(
                total=total or None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                file=self._file,
                dynamic_ncols=True,
                leave=True,
                mininterval=self._mininterval,
            )
        bar = self._bytes
        if desc != bar.desc:
            bar.set_description_str(desc, refresh=False)
        if total and bar.total != total:
            bar.total = total
        return bar

    def _finish_bytes(self) -> None:
        if self._bytes is not None:
            if self._bytes.total:
                self._bytes.n = self._bytes.total
            self._bytes.refresh()
            self._bytes.close()
            self._bytes = None

    def on_upload(self, done: int, total: int) -> None:
        bar = self._bytes_bar("uploading", total)
        bar.update(done - bar.n)

    def message(self, text: str) -> None:
        if self._bytes is not None and self._bytes.desc == "uploading":
            self._finish_bytes()  # the job exists, so the upload is complete
        tqdm.write(text, file=self._file)

    def _audio_bar(self, desc: str, total: float) -> tqdm:
        if self._audio is None:
            self._audio = tqdm(
                total=total or None,
                desc=desc,
                file=self._file,
                dynamic_ncols=True,
                leave=True,
                mininterval=self._mininterval,
                bar_format=_AUDIO_FORMAT if total else _AUDIO_FORMAT_NO_TOTAL,
            )
        bar = self._audio
        if total and bar.total != total:
            bar.total = total
            bar.bar_format = _AUDIO_FORMAT
        if desc != bar.desc:
            bar.set_description_str(desc, refresh=False)
        return bar

    def on_event(self, event: pb.JobEvent) -> None:
        kind = event.WhichOneof("event")
        if self._bytes is not None and self._bytes.desc == "uploading":
            self._finish_bytes()  # the server has the file: the upload bar is complete
        if kind == "progress":
            p = event.progress
            phase = p.phase or event.state
            if phase == pb.JOB_STATE_DOWNLOADING:
                bar = self._bytes_bar("downloading", p.bytes_total)
                bar.update(p.bytes_done - bar.n)  # update() rate-limits the redraws
            elif phase in _AUDIO_PHASES:
                self._finish_bytes()
                bar = self._audio_bar(phase_label(phase), p.audio_seconds_total)
                bar.set_postfix_str(speed_text(p), refresh=False)
                bar.n = p.audio_seconds_done
                bar.update(0)
        elif kind == "result":
            self._finish_bytes()
            if self._audio is not None:
                bar = self._audio_bar("done", event.result.duration_seconds)
                bar.n = bar.total or bar.n
                bar.refresh()
            self.close()
        elif kind == "error":
            self.close()

    def close(self) -> None:
        for bar in (self._bytes, self._audio):
            if bar is not None:
                bar.close()
        self._bytes = self._audio = None


class LogProgress(ProgressView):
    """Plain lines for logs and pipes: one at each phase change, else one per `interval`."""

    def __init__(
        self,
        file: TextIO,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._file = file
        self._interval = interval
        self._clock = clock
        self._last_phase = ""
        self._last_time = float("-inf")

    def _emit(self, phase: str, text: str, *, force: bool = False) -> None:
        now = self._clock()
        if not force and phase == self._last_phase and now - self._last_time < self._interval:
            return
        self._last_phase, self._last_time = phase, now
        print(f"longscribe: {phase}: {text}", file=self._file, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self._file, flush=True)

    def on_upload(self, done: int, total: int) -> None:
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        self._emit("uploading", f"{_size(done)} of {_size(total)}{pct}", force=done >= total)

    def on_event(self, event: pb.JobEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "progress":
            p = event.progress
            phase = p.phase or event.state
            label = phase_label(phase)
            if phase == pb.JOB_STATE_DOWNLOADING and not (p.bytes_done or p.bytes_total):
                text = p.message or "starting"
            elif phase == pb.JOB_STATE_DOWNLOADING:
                text = _size(p.bytes_done)
                if p.bytes_total:
                    pct = 100 * p.bytes_done / p.bytes_total
                    text += f" of {_size(p.bytes_total)} ({pct:.0f}%)"
            elif phase in _AUDIO_PHASES:
                text = f"{p.audio_seconds_done:.0f}"
                if p.audio_seconds_total:
                    text += f" of {p.audio_seconds_total:.0f}"
                text += f" s audio ({p.percent:.0f}% of the job)"
                if extra := speed_text(p):
                    text += ", " + extra
            else:
                text = p.message or f"{p.percent:.0f}%"
            self._emit(label, text)
        elif kind == "result":
            r = event.result
            self._emit(
                "done",
                f"{r.duration_seconds:.1f} s audio, {len(r.segments)} segments"
                + (f", language {r.language}" if r.language else ""),
                force=True,
            )


def make_progress(mode: str = "auto", file: TextIO | None = None) -> ProgressView:
    """`auto`: bars on a terminal, log lines otherwise; `bars` forces bars; `off` is quiet."""
    file = file if file is not None else sys.stderr
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}")
    if mode == "auto":
        isatty = getattr(file, "isatty", None)
        mode = "bars" if isatty is not None and isatty() else "log"
    if mode == "bars":
        return BarProgress(file)
    if mode == "log":
        return LogProgress(file)
    return ProgressView()

"""Silence-aware segmentation: cut a 16 kHz audio stream into windows of at most 30 s of speech.

A frame scorer (silero-vad by default, or an energy detector) gives every 32 ms frame a speech
probability; a hysteresis state machine turns those into speech spans; a packer joins spans into
windows, cutting only in the gaps between spans (a span longer than a window is split at its
quietest frame). Long non-speech is never put in a window, so silence, noise and tones produce no
windows and no text. Everything streams: only the open window and a frame's leftover are kept.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .transcriber import SAMPLE_RATE

FRAME = 512  # silero-vad's frame at 16 kHz (32 ms); the energy detector uses the same grid
BLOCK = 256  # frames scored together (8.2 s)


@dataclass(frozen=True)
class Window:
    """At most `max_window_seconds` of audio, cut at silences, with its exact absolute offset."""

    index: int
    start_sample: int
    samples: np.ndarray = field(repr=False)
    # the speech spans inside the window (absolute samples): the engine splits segments at the
    # pauses between them
    speech: tuple[tuple[int, int], ...] = field(default=(), repr=False)
    # words already transcribed from the window's start (a live partial's settled words):
    # engines that accept a prefix force them into the decode and transcribe what follows
    prefix: str = ""

    @property
    def end_sample(self) -> int:
        return self.start_sample + len(self.samples)

    @property
    def start(self) -> float:
        return self.start_sample / SAMPLE_RATE

    @property
    def end(self) -> float:
        return self.end_sample / SAMPLE_RATE

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


class FrameScorer(Protocol):
    def reset(self) -> None: ...

    def score(self, frames: np.ndarray) -> np.ndarray:
        """(n, FRAME) float32 frames, in stream order → n speech probabilities in [0, 1]."""
        ...


_silero_lock = threading.Lock()
_silero_model: Any = None


def _load_silero() -> Any:
    """The silero-vad TorchScript model, loaded once per process and shared (read-only weights)."""
    global _silero_model
    with _silero_lock:
        if _silero_model is None:
            import torch

            # silero_vad.model calls torch.set_num_threads(1) at import; undo that side effect.
            threads = torch.get_num_threads()
            import silero_vad

            _silero_model = silero_vad.load_silero_vad()
            torch.set_num_threads(threads)
        return _silero_model


class SileroScorer:
    """silero-vad, computed in bulk: its STFT+conv front end is stateless per frame (given 64
    samples of context), so it runs on all frames of a chunk at once and only the LSTM steps
    through time (as one nn.LSTM call). Same numbers as calling the model frame by frame, ~20x
    faster on CPU."""

    CONTEXT = 64

    def __init__(self) -> None:
        import torch

        from .torch_threads import single_threaded

        self._torch = torch
        self._single_threaded = single_threaded  # all its torch work: see torch_threads
        jit = _load_silero()._model
        self._stft = jit.stft
        self._encoder = jit.encoder
        rnn = jit.decoder.rnn
        with single_threaded(), torch.no_grad():
            self._lstm = torch.nn.LSTM(128, 128, batch_first=False)
            self._lstm.weight_ih_l0.copy_(rnn.weight_ih)
            self._lstm.weight_hh_l0.copy_(rnn.weight_hh)
            self._lstm.bias_ih_l0.copy_(rnn.bias_ih)
            self._lstm.bias_hh_l0.copy_(rnn.bias_hh)
        head = jit.decoder.decoder
        self._head_w = getattr(head, "2").weight.detach().reshape(1, 128)
        self._head_b = getattr(head, "2").bias.detach()
        self.reset()

    def reset(self) -> None:
        self._context = np.zeros(self.CONTEXT, dtype=np.float32)
        self._state: tuple[Any, Any] | None = None

    def score(self, frames: np.ndarray) -> np.ndarray:
        torch = self._torch
        n = frames.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        flat = np.concatenate([self._context, frames.reshape(-1)])
        # frame i with the 64 samples before it, as the model's own streaming wrapper does
        idx = np.arange(n)[:, None] * FRAME + np.arange(FRAME + self.CONTEXT)[None, :]
        x = torch.from_numpy(flat[idx])
        self._context = flat[-self.CONTEXT:].copy()
        with self._single_threaded(), torch.inference_mode():  # a feeder's: see torch_threads
            feats = self._encoder(self._stft(x)).squeeze(-1)  # (n, 128)
            h, self._state = self._lstm(feats.unsqueeze(1), self._state)
            logits = torch.relu(h.squeeze(1)) @ self._head_w.T + self._head_b
            return torch.sigmoid(logits).squeeze(1).numpy().astype(np.float32)


def warm_up() -> None:
    """silero-vad is TorchScript: its first calls run the profiling executor (slow); run them
    before the first job does."""
    scorer = SileroScorer()
    noise = np.random.default_rng(0).standard_normal((BLOCK, FRAME)).astype(np.float32)
    for _ in range(3):
        scorer.score(0.01 * noise)


class LevelNormalizer:
    """Gain before the speech detector, so that a quiet speaker after a loud one is still seen.

    silero-vad is stateful: after loud speech its LSTM ignores speech 30-40 dB quieter for
    seconds (a clip it detects alone). Each frame is scaled so that the loudest frame of the
    last `hold` frames (the frame itself included) reaches `target_db`: causal and max-held, so
    a loud onset is never boosted and a quiet talker is lifted within `hold` frames. The gain is
    at most `max_gain_db`, and frames held below `floor_db` (digital silence, dither) keep
    theirs. Only the detector hears the gain; the engine decodes the original audio."""

    def __init__(self, hold: int = 31, target_db: float = -25.0, max_gain_db: float = 45.0,
                 floor_db: float = -85.0) -> None:
        self.hold = hold
        self.target_db = target_db
        self.max_gain_db = max_gain_db
        self.floor_db = floor_db
        self.reset()

    def reset(self) -> None:
        self._recent = np.full(self.hold, -200.0)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if len(frames) == 0:
            return frames
        power = np.mean(frames.astype(np.float64) ** 2, axis=1)
        level = 10 * np.log10(power + 1e-20)
        history = np.concatenate([self._recent, level])
        self._recent = history[-self.hold:]
        held = np.lib.stride_tricks.sliding_window_view(history, self.hold + 1).max(axis=1)
        gain_db = np.where(held < self.floor_db, 0.0,
                           np.clip(self.target_db - held, 0.0, self.max_gain_db))
        return frames * (10 ** (gain_db / 20)).astype(np.float32)[:, None]


class NormalizedScorer:
    """A frame scorer that hears the audio through a LevelNormalizer."""

    def __init__(self, inner: FrameScorer, normalizer: LevelNormalizer | None = None) -> None:
        self.inner = inner
        self.normalizer = normalizer or LevelNormalizer()

    def reset(self) -> None:
        self.inner.reset()
        self.normalizer.reset()

    def score(self, frames: np.ndarray) -> np.ndarray:
        return self.inner.score(self.normalizer(frames))


class EnergyScorer:
    """Frame loudness against an adaptive noise floor (10th percentile of the last ~15 s):
    speech is a frame well above the floor and above an absolute gate. Cheap, but it cannot tell
    speech from loud non-stationary noise; kept as a fallback and for comparison."""

    def __init__(self, margin_db: float = 12.0, gate_db: float = -50.0, history: int = 470):
        self.margin_db = margin_db
        self.gate_db = gate_db
        self._history: deque[float] = deque(maxlen=history)

    def reset(self) -> None:
        self._history.clear()

    def score(self, frames: np.ndarray) -> np.ndarray:
        rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
        db = 20 * np.log10(rms)
        out = np.empty(len(db), dtype=np.float32)
        for i, d in enumerate(db):
            self._history.append(float(d))
            floor = float(np.percentile(self._history, 10)) if len(self._history) > 30 else -90.0
            thr = max(floor + self.margin_db, self.gate_db)
            out[i] = 1.0 / (1.0 + np.exp(-(d - thr) / 2.0))
        return out


@dataclass
class _Span:
    start: int  # absolute samples
    end: int


class Segmenter:
    """Streams windows out of contiguous audio chunks (objects with `start_sample` and float32
    16 kHz `samples`). Same audio in any chunking gives the same windows (same indices)."""

    def __init__(
        self,
        method: str = "silero",
        max_window_seconds: float = 30.0,
        *,
        threshold: float = 0.5,
        min_silence_ms: int = 160,
        min_speech_ms: int = 250,
        pad_ms: int = 200,
        join_seconds: float = 1.0,
        max_gap_seconds: float = 3.0,
        fill_fraction: float = 0.5,
        later_bonus: float = 0.02,
        energy_margin_db: float = 12.0,
        normalize: bool = True,
    ) -> None:
        if method not in ("silero", "energy"):
            raise ValueError(f"unknown segmentation method {method!r}: use 'silero' or 'energy'")
        self.method = method
        self.max_window = int(max_window_seconds * SAMPLE_RATE)
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.min_silence = int(min_silence_ms * SAMPLE_RATE / 1000)
        self.min_speech = int(min_speech_ms * SAMPLE_RATE / 1000)
        self.pad = int(pad_ms * SAMPLE_RATE / 1000)
        # windows split inside a pause up to 2 * join_seconds long are contiguous (soft speech
        # the VAD missed stays in); longer pauses keep only `pad` of silence on each side
        self.join = int(join_seconds * SAMPLE_RATE)
        self.max_gap = int(max_gap_seconds * SAMPLE_RATE)
        # when a window is full, cut at the best pause in its last (1 - fill_fraction) part;
        # later_bonus is seconds of pause worth one second more of window
        self.fill_fraction = fill_fraction
        self.later_bonus = later_bonus
        self.energy_margin_db = energy_margin_db
        # silero hears level-normalised audio (LevelNormalizer); the energy detector has its
        # own adaptive floor
        self.normalize = normalize
        self.max_span = self.max_window - 2 * self.pad

    def _scorer(self) -> FrameScorer:
        if self.method == "silero":
            return NormalizedScorer(SileroScorer()) if self.normalize else SileroScorer()
        return EnergyScorer(margin_db=self.energy_margin_db)

    def windows(self, chunks: Iterable[Any]) -> Iterator[Window]:
        return _SegmentRun(self, self._scorer()).run(chunks)


class _SegmentRun:
    """The state of one pass over one stream."""

    def __init__(self, seg: Segmenter, scorer: FrameScorer) -> None:
        self.s = seg
        self.scorer = scorer
        self.buf = np.zeros(0, dtype=np.float32)
        self.buf_start = 0  # absolute sample of buf[0]
        self.pos = 0  # absolute sample of the next frame to score
        self.expected = None  # next chunk's start_sample (contiguity check)
        # speech state machine
        self.triggered = False
        self.span_start = 0
        self.temp_end = 0
        self.span_probs: list[float] = []  # probs of the open span's frames (for forced splits)
        # packer state
        self.pending: list[_Span] = []  # spans of the open window
        self.last_end = 0  # end of the last emitted window (windows never overlap)
        self.next_start: int | None = None  # set when the last cut was inside a short pause
        self.index = 0

    # --- input ---------------------------------------------------------------------------
    def run(self, chunks: Iterable[Any]) -> Iterator[Window]:
        for chunk in chunks:
            samples = np.asarray(chunk.samples, dtype=np.float32).reshape(-1)
            start = int(chunk.start_sample)
            if self.expected is None:
                self.buf_start = self.pos = start
                self.last_end = start
            elif start != self.expected:
                raise ValueError(
                    f"audio chunks are not contiguous: expected sample {self.expected}, got {start}"
                )
            self.expected = start + len(samples)
            self.buf = np.concatenate([self.buf, samples])
            yield from self._score_ready(final=False)
            self._trim()
        if self.expected is None:
            return
        yield from self._score_ready(final=True)
        yield from self._finish()

    def _score_ready(self, final: bool) -> Iterator[Window]:
        end = self.buf_start + len(self.buf)
        n = (end - self.pos) // FRAME
        if not final:
            # score in fixed blocks aligned to the stream start: the same frames go through the
            # same kernels whatever the chunking, so probabilities (and windows) are bit-identical
            n -= n % BLOCK
        frames = self.buf[self.pos - self.buf_start:][: n * FRAME].reshape(n, FRAME)
        if final and (end - self.pos) % FRAME:
            tail = self.buf[self.pos - self.buf_start + n * FRAME:]
            frames = np.concatenate([frames, np.pad(tail, (0, FRAME - len(tail)))[None]])
        probs = self.scorer.score(frames)
        for p in probs:
            frame_start = self.pos
            self.pos = min(self.pos + FRAME, end)
            yield from self._step(float(p), frame_start)

    # --- speech spans ----------------------------------------------------------------------
    def _step(self, p: float, at: int) -> Iterator[Window]:
        s = self.s
        if not self.triggered:
            if p >= s.threshold:
                self.triggered = True
                self.span_start = at
                self.temp_end = 0
                self.span_probs = [p]
            return
        self.span_probs.append(p)
        if p >= s.threshold:
            self.temp_end = 0
        elif p < s.neg_threshold:
            if not self.temp_end:
                self.temp_end = at
            if self.pos - self.temp_end >= s.min_silence:
                self.triggered = False
                if self.temp_end - self.span_start >= s.min_speech:
                    yield from self._add_span(_Span(self.span_start, self.temp_end))
                return
        if self.pos - self.span_start > s.max_span:
            # one span longer than a window: split at its quietest frame in the second half
            probs = np.asarray(self.span_probs)
            half = len(probs) // 2
            k = half + int(np.argmin(probs[half:]))
            cut = self.span_start + k * FRAME
            yield from self._add_span(_Span(self.span_start, cut))
            self.span_start = cut
            self.span_probs = self.span_probs[k:]
            self.temp_end = 0

    # --- packing spans into windows --------------------------------------------------------
    def _add_span(self, span: _Span) -> Iterator[Window]:
        s = self.s
        while self.pending:
            first = self.pending[0]
            gap = span.start - self.pending[-1].end
            fits = span.end + s.pad - max(first.start - s.pad, self.last_end) <= s.max_window
            if fits and gap <= s.max_gap:
                break
            if gap > s.max_gap:
                yield self._emit(len(self.pending), span.start)
            else:
                yield self._emit(self._best_cut(), span.start)
        self.pending.append(span)

    def _best_cut(self) -> int:
        """How many pending spans go into the window being closed: cut at the longest pause
        (sentence ends pause longer than words do) in the window's later part, with a small
        bonus for cutting later (fewer, fuller windows)."""
        s = self.s
        spans = self.pending
        win_start = max(spans[0].start - s.pad, self.last_end)
        earliest = win_start + int(s.fill_fraction * s.max_window)
        best, best_score = len(spans), -1.0
        for i in range(1, len(spans)):
            if spans[i - 1].end >= earliest:
                gap = (spans[i].start - spans[i - 1].end) / SAMPLE_RATE
                score = gap + s.later_bonus * (spans[i - 1].end - win_start) / SAMPLE_RATE
                if score > best_score:
                    best, best_score = i, score
        return best

    def _emit(self, count: int, next_start: int | None) -> Window:
        s = self.s
        spans, self.pending = self.pending[:count], self.pending[count:]
        start = self.next_start
        if start is None:
            start = max(spans[0].start - s.pad, self.last_end, self.buf_start)
        nxt = self.pending[0].start if self.pending else next_start
        end = spans[-1].end + s.pad
        self.next_start = None
        if nxt is not None and nxt - spans[-1].end <= 2 * s.join:
            # a pause between words or sentences: cut in its middle, drop nothing
            end = self.next_start = (spans[-1].end + nxt) // 2
        end = min(end, self.buf_start + len(self.buf), start + s.max_window)
        if self.next_start is not None:
            self.next_start = end
        window = Window(
            self.index, start, self.buf[start - self.buf_start:end - self.buf_start].copy(),
            tuple((max(sp.start, start), min(sp.end, end)) for sp in spans),
        )
        self.index += 1
        self.last_end = end
        return window

    def _finish(self) -> Iterator[Window]:
        if self.triggered and self.pos - self.span_start >= self.s.min_speech:
            end = self.temp_end or self.pos
            yield from self._add_span(_Span(self.span_start, end))
        self.triggered = False
        while self.pending:
            yield self._emit(len(self.pending), None)

    def _trim(self) -> None:
        """Drop audio no future window can contain."""
        keep = self.pos - self.s.pad - FRAME
        if self.pending:
            keep = min(keep, self.pending[0].start - self.s.pad)
        if self.next_start is not None:
            keep = min(keep, self.next_start)
        if self.triggered:
            keep = min(keep, self.span_start - self.s.pad)
        keep = max(keep, self.last_end, self.buf_start)
        if keep > self.buf_start:
            self.buf = self.buf[keep - self.buf_start:]
            self.buf_start = keep

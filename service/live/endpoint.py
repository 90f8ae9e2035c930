"""Streaming endpointing: silero-vad (service/segment.py's bulk scorer, on level-normalised
audio) over a live stream, turning speech probabilities into utterances.

An utterance opens at the first speech frame (less `lead_ms`), takes in every speech span that
follows with pauses shorter than `endpoint_ms`, and closes (an endpoint) once `endpoint_ms` of
non-speech follow its last span; it ends `pad` after that span. One that grows past
`max_utterance_s` is cut at its quietest frame in its second half (whisper reads at most 30 s).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..segment import FRAME, FrameScorer, NormalizedScorer, SileroScorer
from ..transcriber import SAMPLE_RATE

_onnx_lock = threading.Lock()
_onnx_session: Any = None


def _silero_onnx() -> Any:
    """silero-vad's ONNX model, one session per process (onnxruntime's run() is thread-safe;
    each source keeps its own state)."""
    global _onnx_session
    with _onnx_lock:
        if _onnx_session is None:
            from importlib import resources

            import onnxruntime

            opts = onnxruntime.SessionOptions()
            opts.inter_op_num_threads = 1
            opts.intra_op_num_threads = 1
            path = str(resources.files("silero_vad.data").joinpath("silero_vad.onnx"))
            _onnx_session = onnxruntime.InferenceSession(
                path, sess_options=opts, providers=["CPUExecutionProvider"])
        return _onnx_session


class OnnxSileroScorer:
    """silero-vad frame by frame through onnxruntime: a live source scores a few frames per
    call, where the TorchScript model's per-call overhead (tens of ms on a busy 2-core CPU)
    would cost more than the frames (0.3 ms each here). Same model, same state machine."""

    CONTEXT = 64

    def __init__(self) -> None:
        self._session = _silero_onnx()
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, self.CONTEXT), dtype=np.float32)

    def score(self, frames: np.ndarray) -> np.ndarray:
        out = np.empty(len(frames), dtype=np.float32)
        for i, frame in enumerate(frames):
            x = np.concatenate([self._context, frame[None, :].astype(np.float32)], axis=1)
            prob, self._state = self._session.run(
                None, {"input": x, "state": self._state, "sr": self._sr})
            self._context = x[:, -self.CONTEXT:]
            out[i] = float(prob[0, 0])
        return out


def default_scorer() -> FrameScorer:
    """ONNX silero when onnxruntime is installed, else the TorchScript one; both hear the
    audio level-normalised (a quiet talker after a loud one is still heard)."""
    try:
        inner: FrameScorer = OnnxSileroScorer()
    except ImportError:
        inner = SileroScorer()
    return NormalizedScorer(inner)


@dataclass(frozen=True)
class Utterance:
    index: int
    start: int  # absolute samples, leading pad included
    end: int  # trailing pad included
    speech: tuple[tuple[int, int], ...] = field(repr=False)  # speech spans inside it

    @property
    def speech_end(self) -> int:
        """Where its last speech ends: the final-latency clock starts when this arrives."""
        return self.speech[-1][1] if self.speech else self.end


class Endpointer:
    def __init__(self, *, threshold: float = 0.5, min_silence_ms: int = 100,
                 endpoint_ms: int = 300, min_speech_ms: int = 200, pad_ms: int = 200,
                 lead_ms: int = 400,
                 max_utterance_s: float = 20.0, scorer: FrameScorer | None = None,
                 first_index: int = 0) -> None:
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        ms = SAMPLE_RATE // 1000
        self.min_silence = min_silence_ms * ms  # a pause this long ends a speech span
        self.endpoint = endpoint_ms * ms  # a pause this long ends the utterance
        self.min_speech = min_speech_ms * ms
        self.pad = pad_ms * ms
        # more before than after: silero rises 0.1-0.3 s into speech (its state starts cold)
        self.lead = lead_ms * ms
        self.max_utterance = int(max_utterance_s * SAMPLE_RATE)
        self.scorer = scorer or default_scorer()
        self.next_index = first_index
        self._leftover = np.zeros(0, dtype=np.float32)
        self.pos = 0  # absolute sample after the last scored frame
        self.floor = 0  # no utterance may start before this (the previous one's end)
        self._triggered = False
        self._span_start = 0
        self._temp_end = 0
        self._open: int | None = None  # start of the open utterance (pad included)
        self._spans: list[tuple[int, int]] = []
        self._probs: list[float] = []  # per frame since the open utterance's first speech
        self._probs_start = 0

    # --- state seen from outside --------------------------------------------------------------
    @property
    def open_start(self) -> int | None:
        """Start of the utterance being spoken (None between utterances)."""
        return self._open

    @property
    def in_speech(self) -> bool:
        return self._open is not None

    @property
    def pausing(self) -> bool:
        """Inside an utterance, in a pause: its endpoint may be a few frames away."""
        return self._open is not None and (not self._triggered or bool(self._temp_end))

    # --- input ------------------------------------------------------------------------------
    def restart(self, at: int) -> list[Utterance]:
        """Audio was lost before `at`: close the open utterance where the audio stopped, and
        listen afresh from `at` (the detector's memory is of audio that is not contiguous)."""
        closed = self.flush()
        self.scorer.reset()
        self._leftover = np.zeros(0, dtype=np.float32)
        self.pos = self.floor = at
        return closed

    def push(self, at: int, samples: np.ndarray) -> list[Utterance]:
        """Feed samples starting at absolute sample `at` (contiguous with the last push, or the
        first push); returns the utterances that closed."""
        if self.pos == 0 and len(self._leftover) == 0 and at:
            self.pos = self.floor = at
        buf = np.concatenate([self._leftover, samples]) if len(self._leftover) else samples
        n = len(buf) // FRAME
        self._leftover = buf[n * FRAME:].copy()
        if n == 0:
            return []
        probs = self.scorer.score(np.ascontiguousarray(buf[:n * FRAME]).reshape(n, FRAME))
        closed: list[Utterance] = []
        for p in probs:
            frame_start = self.pos
            self.pos += FRAME
            closed.extend(self._step(float(p), frame_start))
        return closed

    def flush(self) -> list[Utterance]:
        """End of the stream: close the open utterance with what there is."""
        closed: list[Utterance] = []
        if self._triggered:
            end = self._temp_end or self.pos
            if end - self._span_start >= self.min_speech:
                self._spans.append((self._span_start, end))
            self._triggered = False
        if self._open is not None and self._spans:
            closed.append(self._close(self._spans[-1][1] + self.pad))
        self._reset_utterance()
        return closed

    # --- the state machine -----------------------------------------------------------------------
    def _step(self, p: float, at: int) -> list[Utterance]:
        if self._open is not None:
            self._probs.append(p)
        if not self._triggered:
            if p >= self.threshold:
                self._triggered = True
                self._span_start = at
                self._temp_end = 0
                if self._open is None:
                    self._open = max(at - self.lead, self.floor)
                    self._probs, self._probs_start = [p], at
            elif self._open is not None and self._spans and \
                    self.pos - self._spans[-1][1] >= self.endpoint:
                end = min(self._spans[-1][1] + self.pad, self.pos)
                return [self._close(end)]
            elif self._open is not None and not self._spans and \
                    self.pos - self._probs_start > self.endpoint + self.min_speech:
                self._reset_utterance()  # a blip too short to be speech
            return self._maybe_cut()
        if p >= self.threshold:
            self._temp_end = 0
        elif p < self.neg_threshold:
            if not self._temp_end:
                self._temp_end = at
            if self.pos - self._temp_end >= self.min_silence:
                self._triggered = False
                if self._temp_end - self._span_start >= self.min_speech or self._spans:
                    self._spans.append((self._span_start, self._temp_end))
        return self._maybe_cut()

    def _maybe_cut(self) -> list[Utterance]:
        if self._open is None or self.pos - self._open <= self.max_utterance:
            return []
        # too long: cut at the quietest frame in the second half of its speech
        probs = np.asarray(self._probs)
        half = len(probs) // 2
        k = half + int(np.argmin(probs[half:]))
        cut = self._probs_start + k * FRAME
        spans = [(s, min(e, cut)) for s, e in self._spans if s < cut]
        if self._triggered and self._span_start < cut:
            spans.append((self._span_start, cut))
        rest = [(max(s, cut), e) for s, e in self._spans if e > cut]
        tail = self._probs[k:]
        self._spans = spans
        closed = self._close(cut) if spans else None
        self._open = self.floor = cut
        self._spans = rest
        if self._triggered:
            self._span_start = max(self._span_start, cut)
        self._probs, self._probs_start = tail, cut
        return [closed] if closed is not None else []

    def _close(self, end: int) -> Utterance:
        assert self._open is not None
        utt = Utterance(self.next_index, self._open, end, tuple(self._spans))
        self.next_index += 1
        self.floor = end
        self._reset_utterance()
        return utt

    def _reset_utterance(self) -> None:
        self._open = None
        self._spans = []
        self._probs = []

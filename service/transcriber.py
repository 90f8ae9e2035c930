"""The engine seam: what the pipeline hands an engine and what it gets back. Imports no torch.

An engine transcribes windows (at most 30 s of 16 kHz audio cut at silences, with absolute
offsets) with decode options and a cancel signal, and yields one `WindowResult` per window, in
window order, with absolute times. Engines are chosen by name (`ENGINES`); every engine runs
behind the same scheduler (`engine.Engine`: cross-job batching, fallback, recovery of skipped
speech, word timings), so only the batch decoder differs between them (`engines.py` maps the
names `torch` and `ct2` to them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

SAMPLE_RATE = 16000
# whisper's defaults (transcribe(prepend_punctuations=..., append_punctuations=...)): these
# are attached to the word next to them, never words of their own
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"


@dataclass(frozen=True)
class DecodeOptions:
    language: str | None = None
    task: str = "transcribe"
    initial_prompt: str | None = None
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    # a quick look (live partials): no word alignment, and no second decode of speech the
    # first one skipped; the text only
    draft: bool = False


@dataclass(frozen=True)
class WordResult:
    word: str  # as whisper spells it: leading space, punctuation attached
    start: float  # absolute seconds
    end: float
    probability: float


@dataclass(frozen=True)
class SegmentResult:
    start: float  # absolute seconds
    end: float
    text: str
    avg_logprob: float  # of this segment's own tokens
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    words: tuple[WordResult, ...] = ()


@dataclass(frozen=True)
class WindowResult:
    index: int
    start: float
    end: float
    segments: list[SegmentResult]
    language: str


class Transcriber(Protocol):
    """What the pipeline needs from an engine, nothing more."""

    name: str  # the engine's name in ENGINES
    is_multilingual: bool

    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout: float | None = 30.0) -> None: ...

    def transcribe(self, windows: Iterable[Any], options: DecodeOptions,
                   cancel: threading.Event) -> Iterator[WindowResult]: ...



def transcript_text(results: Iterable[WindowResult]) -> str:
    """The plain text of window results, in order (for tests and tools)."""
    return " ".join(s.text for r in results for s in r.segments)

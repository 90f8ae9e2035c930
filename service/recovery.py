"""Speech a window's decode left out, decoded again on its own, and what of it to keep.

Whisper sometimes ends a window early (a single closing timestamp after the first sentence) or
never starts on a quiet speaker; the VAD still says where speech was. `uncovered_speech` finds
the VAD speech no decoded word covers; the engine decodes each such region alone, and keeps
its text only where it looks like speech (`anomalous`) and does not repeat the neighbouring
segment's edge words (`trim_overlap`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace
from difflib import SequenceMatcher
from typing import Any

from .transcriber import APPEND_PUNCTUATION, PREPEND_PUNCTUATION, SAMPLE_RATE, SegmentResult

MIN_UNCOVERED = int(0.4 * SAMPLE_RATE)  # shorter uncovered speech is left alone
COVER_SLACK = int(0.15 * SAMPLE_RATE)  # word-bounded segments are this loose
RECOVERY_PAD = int(0.3 * SAMPLE_RATE)


def anomalous(segment: SegmentResult) -> bool:
    """whisper's hallucination test (transcribe(hallucination_silence_threshold=...)): words
    that are improbable, or implausibly short or long, over the segment's first 8 words."""
    words = [w for w in segment.words if w.word.strip() not in _PUNCTUATION][:8]
    if not words:
        return True
    score = 0.0
    for w in words:
        duration = w.end - w.start
        score += (w.probability < 0.15) + (duration < 0.133) * (0.133 - duration) * 15
        score += (duration > 2.0) * (duration - 2.0)
    return score >= 3 or score + 0.01 >= len(words)


_PUNCTUATION = set(PREPEND_PUNCTUATION + APPEND_PUNCTUATION)


def _norm(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def trim_overlap(new: list[SegmentResult], old: list[SegmentResult]) -> list[SegmentResult]:
    """`new` (a recovery decode) without the words that repeat the end of the segment before
    it or the start of the segment after it: a recovery region can reach into words the
    window's decode did transcribe but placed a little off in time."""
    out = []
    for seg in new:
        words = list(seg.words)
        if not words:
            out.append(seg)
            continue
        before = [s for s in old if s.end <= seg.start + 0.5]
        after = [s for s in old if s.start >= seg.end - 0.5]
        if before:
            tail = [_norm(w.word) for w in max(before, key=lambda s: s.end).words]
            k = _overlap(tail, [_norm(w.word) for w in words])
            words = words[k:]
        if after and words:
            head = [_norm(w.word) for w in min(after, key=lambda s: s.start).words]
            k = _overlap([_norm(w.word) for w in words], head)
            words = words[:len(words) - k]
        if not words:
            continue
        if len(words) < len(seg.words):
            seg = replace(seg, words=tuple(words), start=words[0].start, end=words[-1].end,
                          text="".join(w.word for w in words).strip())
        out.append(seg)
    return out


def _overlap(first: list[str], second: list[str]) -> int:
    """The longest k such that the last k words of `first` are the first k of `second` (or
    nearly: a word heard twice, cut differently, is often spelt differently too)."""
    for k in range(min(len(first), len(second)), 0, -1):
        if all(_alike(a, b) for a, b in zip(first[-k:], second[:k], strict=True)):
            return k
    return 0


def _alike(a: str, b: str) -> bool:
    if a == b:
        return True
    return min(len(a), len(b)) >= 3 and SequenceMatcher(None, a, b).ratio() >= 0.6


def uncovered_speech(window: Any, segments: Iterable[SegmentResult]) -> list[tuple[int, int]]:
    """Regions (absolute samples, padded, inside the window) of the window's VAD speech that no
    segment covers: at least MIN_UNCOVERED long, neighbours less than a second apart joined.
    The padding never reaches back into a segment, so its words are not decoded twice."""
    spans = getattr(window, "speech", None)
    if not spans:
        return []
    covered = sorted((int(s.start * SAMPLE_RATE), int(s.end * SAMPLE_RATE)) for s in segments)
    holes: list[list[int]] = []
    for lo, hi in spans:
        cursor = lo
        for cs, ce in covered:
            cs, ce = cs - COVER_SLACK, ce + COVER_SLACK
            if ce <= cursor or cs >= hi:
                continue
            if cs - cursor >= MIN_UNCOVERED:
                holes.append([cursor, cs])
            cursor = max(cursor, ce)
        if hi - cursor >= MIN_UNCOVERED:
            holes.append([cursor, hi])
    merged: list[list[int]] = []
    for lo, hi in holes:
        if merged and lo - merged[-1][1] < SAMPLE_RATE:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    first, last = window.start_sample, window.start_sample + len(window.samples)
    out = []
    for lo, hi in merged:
        before = max([ce for cs, ce in covered if ce <= lo + COVER_SLACK] + [first])
        after = min([cs for cs, ce in covered if cs >= hi - COVER_SLACK] + [last])
        out.append((max(lo - RECOVERY_PAD, before, first), min(hi + RECOVERY_PAD, after, last)))
    return out

"""Each utterance alone, through a real server, as accurate as openai-whisper's `transcribe()` on
the same clip (issue: no speech lost; held-out goal: within 0.5 WER points). The clips
(bench/short_form.py "test" set): LibriSpeech, JFK, LJSpeech sentences, and LibriSpeech made
35 dB quieter or telephone-band; all uploaded at once, as many users would."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.short_form import SETS, build_clips, pooled_wer, service_alone, transcribe_alone
from tests.conftest import ServerProcess

MAX_GAP = 0.005  # pooled WER: at most 0.5 points above transcribe()'s

pytestmark = pytest.mark.timeout(900)


def test_each_utterance_alone_as_accurate_as_transcribe(server: ServerProcess,
                                                         tmp_path: Path) -> None:
    clips = build_clips(tmp_path, SETS["test"])
    references = [c.reference for c in clips]
    ours = service_alone(clips, server.target)
    theirs = transcribe_alone(clips, "auto")
    assert all(text.strip() for text in ours), [c.name for c, t in zip(clips, ours, strict=True)
                                               if not t.strip()]
    ours_wer, theirs_wer = pooled_wer(references, ours), pooled_wer(references, theirs)
    assert ours_wer <= theirs_wer + MAX_GAP, (
        f"each utterance alone: longscribe {ours_wer:.2%}, transcribe() {theirs_wer:.2%}",
        [(c.name, t) for c, t in zip(clips, ours, strict=True)])

"""Uneven loudness, the trap every long-form transcriber falls into (issue: no speech lost),
through a real server: the six LibriSpeech utterances twice, every second one 35 dB quieter,
2 s of silence between them, as mp3 (bench/mix.py UNEVEN). The reference line is
openai-whisper `transcribe()` on each clip alone, cut from the same decoded mp3."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bench.mix import UNEVEN, Mix, build_mix, clip_audio, lost_clips
from tests.conftest import ServerProcess, wer

MAX_GAP = 0.02  # long-form may lose at most 2 WER points against per-clip short-form


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> Mix:
    return build_mix(tmp_path_factory.mktemp("uneven"), UNEVEN)


@pytest.fixture(scope="module")
def per_clip(mix: Mix) -> list[str]:
    import torch
    import whisper
    from longscribe.service.models import load_model

    torch.manual_seed(0)
    audio = whisper.load_audio(str(mix.path))
    model = load_model("", "auto")
    fp16 = next(model.parameters()).is_cuda
    return [model.transcribe(clip_audio(audio, mix, c), fp16=fp16)["text"] for c in mix.clips]


@pytest.fixture(scope="module")
def service(server: ServerProcess, mix: Mix) -> Iterator[Any]:
    from longscribe.client.client import LongscribeClient

    with LongscribeClient(server.target, timeout=60) as client:
        yield client.transcribe(mix.path)


def test_levels_really_are_uneven(mix: Mix) -> None:
    import whisper

    audio = whisper.load_audio(str(mix.path))
    rms = [20 * np.log10(np.sqrt(np.mean(clip_audio(audio, mix, c, pad=0) ** 2)))
           for c in mix.clips]
    loud = [r for r, c in zip(rms, mix.clips, strict=True) if c.effect == "clean"]
    soft = [r for r, c in zip(rms, mix.clips, strict=True) if c.effect == "quiet"]
    assert len(loud) == len(soft) == 6
    assert min(loud) - max(soft) > 20, (loud, soft)


def test_long_form_within_two_points_of_per_clip(mix: Mix, per_clip: list[str],
                                                  service: Any) -> None:
    short = wer(mix.reference, " ".join(per_clip))
    long = wer(mix.reference, service.text)
    assert long <= short + MAX_GAP, (
        f"service {long:.2%} vs per clip {short:.2%}: {service.text}")


def test_every_quiet_speaker_after_a_loud_one_is_transcribed(mix: Mix, per_clip: list[str],
                                                              service: Any) -> None:
    segments = [(s.start, s.end, s.text) for s in service.segments]
    lost = lost_clips(segments, mix, per_clip, margin=0.1)
    assert not lost, "\n".join(lost)


def test_first_word_of_every_utterance(mix: Mix, service: Any) -> None:
    """No clipped openings: each clip's first reference word is the first word we place in
    it, starting within 0.5 s of the clip."""
    from whisper.normalizers import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    words = [w for s in service.segments for w in s.words]
    wrong = []
    for clip in mix.clips:
        inside = [w for w in words if clip.start - 0.5 <= w.start <= clip.end]
        first = norm(clip.reference).split()[0]
        got = norm(inside[0].word).strip() if inside else ""
        if got != first or inside[0].start > clip.start + 0.5:
            wrong.append((clip.name, clip.effect, first, got, inside[0].start if inside else None))
    assert not wrong, wrong


def test_words_in_the_json_format(service: Any) -> None:
    doc = json.loads(service.formats.json)
    segments = doc["segments"]
    assert segments and all(s["words"] for s in segments)
    for s, message in zip(segments, service.segments, strict=True):
        assert [w["word"] for w in s["words"]] == [w.word for w in message.words]
        assert s["words"][0]["start"] >= s["start"] - 1e-3
        assert all(0 < w["probability"] <= 1 for w in s["words"])

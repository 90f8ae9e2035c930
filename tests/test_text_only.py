"""Text-only decoding (`serve --timestamps words`, the default): the decoder emits no timestamp
tokens, as whisper.decode(without_timestamps=True) does, and segments come from the speech
detector's pauses, sentence ends and the aligned words."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import whisper
from longscribe.service.engine import DecodeOptions, Engine, transcript_text
from longscribe.service.engine_align import Piece, WordTiming, split_at_sentences
from longscribe.service.engines import TORCH_BEAM
from longscribe.service.models import load_model
from longscribe.service.segment import Segmenter
from longscribe.service.torch_backend import TorchBackend

from tests.conftest import LJ, lj_text, require_testdata, wer

SR = 16000


@pytest.fixture(scope="module")
def model():
    require_testdata()
    return load_model()


@pytest.fixture(scope="module")
def lj() -> np.ndarray:
    require_testdata()
    return whisper.audio.load_audio(str(LJ))


def chunks(audio: np.ndarray, size: int = 30 * SR):
    from types import SimpleNamespace

    for i in range(0, len(audio), size):
        yield SimpleNamespace(start_sample=i, samples=audio[i:i + size])


@pytest.mark.parametrize("beam", [1, 2])
def test_text_only_decode_is_whispers_without_timestamps(model, lj, beam: int) -> None:
    backend = TorchBackend(model, beam_size=beam)
    tok = backend.tokenizer
    windows = [lj[i * 25 * SR:(i * 25 + 20) * SR] for i in range(3)]
    features = backend.encode(windows)
    initial = [[*tok.sot_sequence, tok.no_timestamps]] * 3
    rows = backend.decode(features, initial, [0.0] * 3, sot_index=0, should_stop=lambda: False)
    for window, row in zip(windows, rows, strict=True):
        assert row.tokens and all(t < tok.timestamp_begin for t in row.tokens), row.tokens
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(window))
        theirs = whisper.decode(model, mel, whisper.DecodingOptions(
            without_timestamps=True, beam_size=beam if beam > 1 else None, fp16=False,
            language="en"))
        ours = tok.decode([t for t in row.tokens if t < tok.eot]).strip()
        assert wer(theirs.text, ours) <= 0.02, (ours, theirs.text)


def test_rows_of_one_decode_share_the_timestamp_mode(model, lj) -> None:
    backend = TorchBackend(model)
    tok = backend.tokenizer
    features = backend.encode([lj[:10 * SR], lj[10 * SR:20 * SR]])
    mixed = torch.tensor([[*tok.sot_sequence, tok.no_timestamps],
                          [tok.sot_prev, *tok.sot_sequence]])
    with pytest.raises(ValueError, match="notimestamps"):
        backend.decoder.decode(features, mixed, [0.0, 0.0], sot_index=0)


def _word(text: str, start: float, end: float, tokens: int = 1) -> WordTiming:
    return WordTiming(text, list(range(tokens)), int(start * SR), int(end * SR))


def test_pieces_are_cut_after_sentence_ends() -> None:
    words = [_word(" One", 0.0, 0.4), _word(" two.", 0.5, 0.9), _word(" Three?", 1.0, 1.6, 2),
             _word(" four", 1.8, 2.2)]
    piece = Piece(0, int(2.5 * SR), [0] * 5, list(words))
    out = split_at_sentences([piece])
    assert [[w.word for w in p.words] for p in out] == [[" One", " two."], [" Three?"], [" four"]]
    assert [(p.start / SR, p.end / SR) for p in out] == [(0.0, 0.9), (1.0, 1.6), (1.8, 2.2)]
    assert [len(p.tokens) for p in out] == [2, 2, 1]
    # words that do not account for every token (a partial alignment): left whole
    partial = Piece(0, SR, [0] * 7, list(words))
    assert split_at_sentences([partial]) == [partial]


def test_text_only_engine_transcribes_the_reading_in_timed_sentences(model, lj) -> None:
    """The server's default decoding (text only, the torch engine's default beam)."""
    engine = Engine(TorchBackend(model, beam_size=TORCH_BEAM), timestamp_tokens=False)
    engine.start()
    try:
        windows = list(Segmenter("silero").windows(chunks(lj)))
        results = list(engine.transcribe(windows, DecodeOptions(), threading.Event()))
    finally:
        engine.stop()
    text = transcript_text(results)
    assert wer(lj_text(), text) <= 0.0523, text  # transcribe()'s 5.23 % on this reading
    segments = [s for r in results for s in r.segments]
    # sentence-sized segments, in order, each bounded by its words
    assert max(s.end - s.start for s in segments) < 15.0
    assert all(a.end <= b.start + 0.05 for a, b in zip(segments, segments[1:], strict=False))
    for s in segments:
        assert s.words, s
        assert abs(s.start - s.words[0].start) < 1e-3 and abs(s.end - s.words[-1].end) < 1e-3
        # a sentence's end ends its segment (the pauses cut segments too)
        inner = [w.word for w in s.words[:-1] if w.word.rstrip().endswith((".", "?", "!"))]
        assert not inner, s.text


def test_live_rows_decode_greedy_and_batch_rows_by_beam(model, lj) -> None:
    """A batch of live rows only (priority > 0) is decoded greedily whatever the engine's beam:
    on a CPU a beam added half a second to final latency and no accuracy to live finals."""
    from longscribe.service.decoding import BatchDecoder

    engine = Engine(TorchBackend(model, beam_size=TORCH_BEAM), timestamp_tokens=False)
    beams: list[int] = []
    decode_beam = BatchDecoder.decode_beam

    def recording(self: BatchDecoder, *args: object, **kwargs: object) -> object:
        beams.append(1)
        return decode_beam(self, *args, **kwargs)

    engine.start()
    texts = {}
    try:
        BatchDecoder.decode_beam = recording  # type: ignore[method-assign]
        for priority in (1, 0):
            windows = Segmenter("silero").windows(chunks(lj[:12 * SR]))
            results = list(engine.transcribe(windows, DecodeOptions(), threading.Event(),
                                             priority=priority))
            texts[priority] = transcript_text(results)
            beams.append(0)  # marks the end of this priority's decodes
    finally:
        BatchDecoder.decode_beam = decode_beam  # type: ignore[method-assign]
        engine.stop()
    live_calls, batch_calls = beams[:beams.index(0)], beams[beams.index(0) + 1:-1]
    assert not live_calls and batch_calls
    for text in texts.values():
        assert wer(" ".join(lj_text().split()[:30]), text) < 0.5, text

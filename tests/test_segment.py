"""Segmentation: windows cut only at silences, exact offsets in any chunking, no windows on
non-speech. Real speech from the shared test data, decoded by ffmpeg (whisper.audio.load_audio)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import whisper
from longscribe.service.segment import SAMPLE_RATE, Segmenter, SileroScorer, _load_silero

from tests.conftest import LJ, TESTDATA, require_testdata

SR = SAMPLE_RATE
LIBRI = ["1089-134686-0002.wav", "1221-135766-0001.wav", "1221-135766-0002.wav",
         "1995-1837-0001.wav", "2412-153948-0000.flac", "2412-153948-0001.flac"]


def chunks(audio: np.ndarray, size: int, start: int = 0):
    for i in range(0, len(audio), size):
        yield SimpleNamespace(start_sample=start + i, samples=audio[i:i + size])


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


@pytest.fixture(scope="module")
def lj() -> np.ndarray:
    require_testdata()
    return whisper.audio.load_audio(str(LJ))


@pytest.fixture(scope="module")
def libri_mix() -> np.ndarray:
    """Six LibriSpeech utterances joined with short pauses, twice (~120 s): continuous
    multi-speaker speech that needs several windows."""
    require_testdata()
    parts = []
    for name in LIBRI * 2:
        parts += [whisper.audio.load_audio(str(TESTDATA / name)), silence(0.3)]
    return np.concatenate(parts)


def window_list(audio: np.ndarray, size: int, **kw) -> list:
    return list(Segmenter(**kw).windows(chunks(audio, size)))


def test_bulk_silero_matches_frame_by_frame(lj: np.ndarray) -> None:
    frames = lj[: 600 * 512].reshape(600, 512)
    scorer = SileroScorer()
    bulk = np.concatenate([scorer.score(frames[:250]), scorer.score(frames[250:])])
    model = _load_silero()
    model.reset_states()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the TorchScript model per 32 ms frame: tiny ops
    with torch.inference_mode():
        ref = np.array([model(torch.from_numpy(f)[None], SR).item() for f in frames])
    torch.set_num_threads(threads)
    np.testing.assert_allclose(bulk, ref, atol=1e-4)


def test_same_windows_in_any_chunking(lj: np.ndarray) -> None:
    base = window_list(lj, len(lj))
    assert len(base) >= 8
    for size in (30 * SR, 7 * SR + 13, 4097):
        other = window_list(lj, size)
        assert [(w.index, w.start_sample, len(w.samples)) for w in other] == \
               [(w.index, w.start_sample, len(w.samples)) for w in base]
        for a, b in zip(base, other, strict=True):
            np.testing.assert_array_equal(a.samples, b.samples)


def test_windows_are_exact_slices_with_absolute_offsets(lj: np.ndarray) -> None:
    offset = 123_457  # the stream may start anywhere (a resumed job, a live stream)
    windows = list(Segmenter().windows(chunks(lj, 5 * SR + 1, start=offset)))
    assert [w.index for w in windows] == list(range(len(windows)))
    prev_end = offset
    for w in windows:
        assert w.start_sample >= prev_end  # ordered, never overlapping
        assert len(w.samples) <= 30 * SR
        np.testing.assert_array_equal(
            w.samples, lj[w.start_sample - offset:w.start_sample - offset + len(w.samples)])
        prev_end = w.start_sample + len(w.samples)


def test_all_speech_is_covered(lj: np.ndarray) -> None:
    """No sentence of the reading loses audio to the segmenter: the windows cover every
    sentence (up to the clips' own silent edges, ~0.25 s)."""
    rows = (TESTDATA / "ljspeech_LJ001-0001_to_0032.segments.tsv").read_text().splitlines()[1:]
    covered = np.zeros(len(lj), dtype=bool)
    for w in window_list(lj, 30 * SR):
        covered[w.start_sample:w.end_sample] = True
    for row in rows:
        _, start, end, _ = row.split("\t")
        s, e = int((float(start) + 0.3) * SR), int((float(end) - 0.3) * SR)
        assert covered[s:e].all(), (start, end)


@pytest.mark.parametrize("source", ["lj", "libri_mix"])
def test_never_cuts_inside_a_vad_span(source: str, request: pytest.FixtureRequest) -> None:
    """Cut points between windows fall outside every speech span silero-vad's own
    get_speech_timestamps reports (all shorter than 30 s here)."""
    from silero_vad import get_speech_timestamps

    audio = request.getfixturevalue(source)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spans = get_speech_timestamps(torch.from_numpy(audio), _load_silero(), speech_pad_ms=0)
    torch.set_num_threads(threads)
    assert all(s["end"] - s["start"] < 30 * SR for s in spans)
    windows = window_list(audio, 10 * SR)
    assert len(windows) >= 3
    edges = [w.start_sample for w in windows] + [w.end_sample for w in windows]
    for edge in edges:
        inside = [s for s in spans if s["start"] + 512 < edge < s["end"] - 512]
        assert not inside, f"window edge at {edge / SR:.2f}s cuts speech span {inside}"


def test_speech_around_a_long_silence_skips_it(libri_mix: np.ndarray) -> None:
    head, tail = libri_mix[: 20 * SR], libri_mix[-20 * SR:]
    audio = np.concatenate([head, silence(60), tail])
    windows = window_list(audio, 30 * SR)
    gap_start, gap_end = len(head) + SR, len(head) + 59 * SR
    for w in windows:
        assert w.end_sample <= gap_start or w.start_sample >= gap_end
    assert sum(w.duration for w in windows) < 45


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


def _tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("make", [silence, _noise, _tone], ids=["silence", "noise", "tone"])
def test_no_windows_on_non_speech(make) -> None:
    assert window_list(make(60), 30 * SR) == []


def test_energy_detector_skips_silence_and_steady_noise(lj: np.ndarray) -> None:
    audio = np.concatenate([lj[: 25 * SR], silence(60), lj[: 25 * SR]])
    windows = window_list(audio, 30 * SR, method="energy")
    assert windows
    for w in windows:
        assert w.end_sample <= 26 * SR or w.start_sample >= 84 * SR
    assert window_list(silence(60), 30 * SR, method="energy") == []


def test_span_longer_than_a_window_is_split_at_its_quietest_point() -> None:
    """A 50 s continuous signal that the energy detector (gate 10 dB under the floor) calls
    speech all along, with one 6 dB softer second at 21-22 s: two windows, cut inside the soft
    stretch, contiguous, each ≤ 30 s."""
    audio = _noise(50, seed=1)
    audio[21 * SR:22 * SR] *= 0.5
    windows = window_list(audio, 8 * SR, method="energy", energy_margin_db=-10.0)
    assert len(windows) == 2
    first, second = windows
    assert first.end_sample == second.start_sample
    assert 21 * SR <= first.end_sample <= 22 * SR
    assert all(w.duration <= 30 for w in windows)


def test_non_contiguous_chunks_are_rejected(lj: np.ndarray) -> None:
    bad = [SimpleNamespace(start_sample=0, samples=lj[:SR]),
           SimpleNamespace(start_sample=2 * SR, samples=lj[SR:2 * SR])]
    with pytest.raises(ValueError, match="not contiguous"):
        list(Segmenter().windows(bad))


def speech_seconds(windows: list, lo: float, hi: float) -> float:
    """Seconds of VAD speech (the windows' speech spans) between lo and hi seconds."""
    return sum(max(0.0, min(e / SR, hi) - max(s / SR, lo)) for w in windows for s, e in w.speech)


def quiet(audio: np.ndarray, db: float = 35.0) -> np.ndarray:
    return (audio * 10 ** (-db / 20)).astype(np.float32)


def test_quiet_speaker_after_a_loud_one_is_detected() -> None:
    """silero's state after loud speech hides a speaker 35 dB quieter (a clip it detects
    alone); the level normaliser in front of it finds the quiet speech again."""
    require_testdata()
    loud = whisper.audio.load_audio(str(TESTDATA / LIBRI[0]))
    soft = quiet(whisper.audio.load_audio(str(TESTDATA / LIBRI[1])))
    audio = np.concatenate([loud, silence(2.0), soft, silence(1.0)])
    lo = (len(loud) + 2 * SR) / SR
    hi = lo + len(soft) / SR
    found = speech_seconds(window_list(audio, 30 * SR), lo, hi)
    assert found >= 0.8 * (hi - lo), (found, hi - lo)
    # the trap is real: the detector on the raw level misses most of it
    raw = speech_seconds(window_list(audio, 30 * SR, normalize=False), lo, hi)
    assert raw < 0.5 * (hi - lo), raw


def test_level_normaliser_finds_no_speech_in_quiet_noise_tones_or_music() -> None:
    """The gain that lifts a quiet talker must not turn quiet noise into speech: 60 s each of
    pink and white noise, a tone and a synthetic melody at -20, -50 and -70 dBFS."""
    rng = np.random.default_rng(5)
    t = np.arange(60 * SR) / SR
    notes = [261.6, 329.6, 392.0, 523.3, 440.0, 349.2]
    melody = np.zeros_like(t)
    for k in range(120):  # half-second plucked notes with two overtones
        part = slice(k * SR // 2, (k + 1) * SR // 2)
        f, env = notes[k % 6], np.exp(-3 * (t[part] - t[part][0]))
        melody[part] = env * sum(a * np.sin(2 * np.pi * f * m * t[part])
                                 for m, a in ((1, 1.0), (2, 0.5), (3, 0.3)))
    white = rng.standard_normal(len(t))
    pink = np.cumsum(white)  # brown-ish; detrended below so it stays bounded
    pink = pink - np.convolve(pink, np.ones(SR) / SR, mode="same")
    signals = {"melody": melody, "white": white, "pink": pink,
               "tone": np.sin(2 * np.pi * 440 * t)}
    for name, signal in signals.items():
        signal = signal / np.sqrt(np.mean(signal ** 2))
        for db in (-20, -50, -70):
            audio = (signal * 10 ** (db / 20)).astype(np.float32)
            windows = window_list(audio, 30 * SR)
            assert not windows, (name, db, [(w.start, w.end) for w in windows])

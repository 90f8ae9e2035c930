"""Same audio and options, same transcript, whatever shares its batch: the same 60 s clip
submitted several times at once, beside different other jobs, gives identical segments (text,
times, log-probabilities, words), through the engine and through a real server. (CPU matmuls
of fewer than 16 rows take other kernels: a window's log-probabilities, and at near ties its
tokens, depended on how many rows its batch had.)"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import whisper
from longscribe.service.engine import DecodeOptions, Engine, WindowResult
from longscribe.service.models import load_model
from longscribe.service.segment import Segmenter

from tests.conftest import JFK, LJ, TESTDATA, ServerProcess, ffmpeg, require_testdata
from tests.test_engine import chunks

SR = 16000


def _segments(results: list[WindowResult]) -> list[tuple]:
    return [(s.start, s.end, s.text, s.avg_logprob, s.temperature,
             tuple((w.word, w.start, w.end, w.probability) for w in s.words))
            for r in results for s in r.segments]


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    require_testdata()
    lj = whisper.audio.load_audio(str(LJ))
    return {"clip": lj[:60 * SR], "other": lj[100 * SR:190 * SR],
            "jfk": whisper.audio.load_audio(str(JFK)),
            "libri": whisper.audio.load_audio(str(TESTDATA / "1221-135766-0001.wav"))}


def test_same_clip_same_segments_in_any_batch(clips: dict[str, np.ndarray]) -> None:
    eng = Engine(load_model(), batch_size=8)
    eng.start()
    try:
        def run(name: str, options: DecodeOptions = DecodeOptions()) -> list[WindowResult]:
            windows = Segmenter().windows(chunks(clips[name]))
            return list(eng.transcribe(windows, options, threading.Event()))

        alone = _segments(run("clip"))
        # fallback on every window: sampled decodes must be reproducible too
        hot = DecodeOptions(temperatures=(0.0, 0.4), compression_ratio_threshold=0.1)
        hot_alone = _segments(run("clip", hot))
        jobs = ["clip", "jfk", "clip", "other", "clip", "libri", "hot"]
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(run, "clip", hot) if name == "hot" else pool.submit(run, name)
                       for name in jobs]
            results = [f.result(timeout=600) for f in futures]
    finally:
        eng.stop()
    assert alone and any(s[5] for s in alone)
    assert eng.stats_snapshot().mixed_job_batches > 0
    for name, result in zip(jobs, results, strict=True):
        if name == "clip":
            assert _segments(result) == alone
    assert _segments(results[-1]) == hot_alone
    assert {s[4] for s in hot_alone} == {0.4}


def test_same_clip_same_transcript_through_a_server(tmp_path: Path) -> None:
    from longscribe.client.client import LongscribeClient

    require_testdata()
    clip = tmp_path / "clip.flac"
    other = tmp_path / "other.mp3"
    ffmpeg("-i", str(LJ), "-t", "60", str(clip))
    ffmpeg("-ss", "100", "-i", str(LJ), "-t", "80", str(other))
    server = ServerProcess(tmp_path / "data", "--workers", "6").start(timeout=300)
    try:
        with LongscribeClient(server.target, timeout=120) as client:
            sources = [clip, JFK, clip, other, clip, clip]
            with ThreadPoolExecutor(len(sources)) as pool:
                results = list(pool.map(client.transcribe, sources))
    finally:
        server.stop()
    same = [r for r, s in zip(results, sources, strict=True) if s == clip]
    key = [[(s.start, s.end, s.text, s.avg_logprob) for s in r.segments] for r in same]
    assert same[0].text and all(k == key[0] for k in key), [r.text for r in same]


def test_prioritised_rows_decode_unpadded_to_the_same_text(clips: dict[str, np.ndarray]) -> None:
    """Live audio's rows (priority > 0) skip the padding that makes a row batch-invariant (a
    lone final decodes in about half the time on a CPU): the text and timings are still those of
    the invariant decode; only log-probabilities may move in their last digits."""
    from longscribe.service.decoding import BatchDecoder

    eng = Engine(load_model(), batch_size=8)
    calls: list[bool] = []
    decode = BatchDecoder.decode

    def recording(self: BatchDecoder, *args: object, **kwargs: object) -> object:
        calls.append(bool(kwargs.get("batch_invariant", True)))
        return decode(self, *args, **kwargs)

    eng.start()
    try:
        BatchDecoder.decode = recording  # type: ignore[method-assign]
        results = {}
        for priority in (0, 1):
            windows = Segmenter().windows(chunks(clips["jfk"]))
            results[priority] = list(eng.transcribe(windows, DecodeOptions(), threading.Event(),
                                                    priority=priority))
    finally:
        BatchDecoder.decode = decode  # type: ignore[method-assign]
        eng.stop()
    assert True in calls and False in calls
    batch, live = (_segments(results[p]) for p in (0, 1))
    assert batch and "ask not what your country" in " ".join(s[2] for s in batch).lower()
    assert [s[:3] for s in live] == [s[:3] for s in batch]
    assert [[w[:3] for w in s[5]] for s in live] == [[w[:3] for w in s[5]] for s in batch]


def test_a_row_decodes_the_same_at_any_place_in_its_batch(clips: dict[str, np.ndarray]) -> None:
    """The decoder alone: the same window at odd and even places of its batch, with a prompt
    of odd length, gives the same tokens and log-probabilities to the last bit (over an odd
    number of cached keys a CPU's batched matmul rounded a row's scores differently at odd
    places: test_same_clip_same_segments_in_any_batch failed on an AMD EPYC)."""
    import torch
    from longscribe.service.torch_backend import TorchBackend

    backend = TorchBackend(load_model())
    tok = backend.tokenizer
    prompt = tok.encode(" Printing, in the only sense with which we are at present concerned")
    initial = [tok.sot_prev, *prompt[-(len(prompt) // 2 * 2 - 1):], *tok.sot_sequence]
    lj = clips["clip"]
    windows = [lj[:20 * SR], lj[20 * SR:40 * SR], lj[40 * SR:60 * SR]]
    with torch.inference_mode():
        features = backend.encode(windows)

        def decode(order: list[int]) -> list:
            rows = backend.decoder.decode(features[order], torch.tensor([initial] * len(order)),
                                          [0.0] * len(order), sot_index=len(initial) - 1,
                                          should_stop=lambda: False)
            return [(r.tokens, r.token_logprobs, r.no_speech_prob) for r in rows]

        alone = decode([0])[0]
        assert len(alone[0]) > 20
        for order in ([1, 0], [2, 1, 0], [1, 2, 0, 1, 2, 1, 0]):
            for place, row in zip(order, decode(order), strict=True):
                if place == 0:
                    assert row == alone, order

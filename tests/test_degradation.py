"""Graceful degradation of the local engine: the real torch backend made slow (a delay after
each decode) with a tiny batch and several jobs queues more work than the engine drains, so it
steps down (no temperature fallback, then no word alignment: the torch engine has no beam to
shrink), shows the step in its progress message and in /metrics' series, steps back up once
the queue drains, and every window of every job is still transcribed."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import whisper
from longscribe.service import metrics
from longscribe.service.engine import DecodeOptions, Engine, WindowResult, transcript_text
from longscribe.service.models import load_model
from longscribe.service.segment import Segmenter

from tests.conftest import LJ, require_testdata, wer
from tests.test_engine import chunks

SR = 16000


def test_slow_engine_steps_down_and_back_up() -> None:
    require_testdata()
    clip = whisper.audio.load_audio(str(LJ))[:60 * SR]
    model = load_model()
    windows = list(Segmenter().windows(chunks(clip)))

    def run(eng: Engine) -> list[WindowResult]:
        return list(eng.transcribe(iter(windows), DecodeOptions(), threading.Event()))

    full = Engine(model, batch_size=2, degrade_after=None)
    full.start()
    try:
        reference = transcript_text(run(full))
    finally:
        full.stop()

    eng = Engine(model, batch_size=1, degrade_after=1.5, degrade_dwell=0.5)
    decode = eng.backend.decode

    def slow_decode(*args, **kwargs):
        time.sleep(0.3)  # an engine slower than the jobs feed it
        return decode(*args, **kwargs)

    eng.backend.decode = slow_decode
    registry = metrics.default().registry
    downs = registry.get_sample_value("longscribe_engine_degradation_steps_total",
                                      {"direction": "down"}) or 0.0
    messages: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            messages.add(eng.degradation_message)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    eng.start()
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: run(eng), range(4)))
        deepest = eng.stats_snapshot().max_degradation
        deadline = time.monotonic() + 10
        while eng.degradation and time.monotonic() < deadline:  # idle: back up, step by step
            time.sleep(0.1)
    finally:
        done.set()
        watcher.join()
        eng.stop()
    assert deepest == 3, eng.stats_snapshot()  # 0 → 1 → 3 (no beam step on torch)
    assert eng.degradation == 0 and eng.degradation_message == ""
    assert {"engine overloaded: no temperature fallback",
            "engine overloaded: no word alignment"} <= messages, messages
    assert registry.get_sample_value("longscribe_engine_degradation_steps_total",
                                     {"direction": "down"}) >= downs + 2
    assert registry.get_sample_value("longscribe_engine_degradation_level") == 0
    for result in results:  # nothing dropped: every window, the whole text
        assert [r.index for r in result] == [w.index for w in windows]
        assert wer(reference, transcript_text(result)) <= 0.1
    segments = [s for result in results for r in result for s in r.segments]
    assert any(not s.words for s in segments)  # decoded while alignment was off
    assert any(s.words for s in segments)

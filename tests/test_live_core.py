"""The live core (service/live/) against the real engine (offline tiny.en) and real speech:
endpoints on the LJSpeech reading, finals with absolute times and words, partials, two
sources kept apart, overflow (drop-oldest, reject, a source closed for overflowing), bad
frames. No gRPC here: tests/test_live_e2e.py drives the same code through a real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import whisper
from longscribe.service.engine import Engine
from longscribe.service.errors import JobError
from longscribe.service.live.endpoint import Endpointer
from longscribe.service.live.frames import check_config
from longscribe.service.live.runtime import LiveRuntime
from longscribe.service.live.session import LiveLimits, LiveSession, settled_words
from longscribe.service.live.source import RingBuffer, StatusTracker
from longscribe.service.models import load_model
from longscribe.v1 import transcription_pb2 as pb

from tests.conftest import JFK, LJ, TESTDATA, jfk_text, lj_text, require_testdata, wer

SR = 16000
FRAME = 1600  # 100 ms


def s16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def lj_sentences() -> list[tuple[float, float, str]]:
    lines = (TESTDATA / "ljspeech_LJ001-0001_to_0032.segments.tsv").read_text().splitlines()[1:]
    return [(float(a), float(b), t) for _, a, b, t in (line.split("\t") for line in lines)]


@pytest.fixture(scope="module")
def lj_audio() -> np.ndarray:
    require_testdata()
    return whisper.audio.load_audio(str(LJ))


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    require_testdata()
    e = Engine(load_model())
    e.start()
    yield e
    e.stop()


@pytest.fixture()
def runtime(engine: Engine) -> Iterator[LiveRuntime]:
    rt = LiveRuntime(engine)
    yield rt
    rt.stop()


class Events:
    def __init__(self) -> None:
        self.items: list[pb.LiveEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: pb.LiveEvent) -> None:
        with self.lock:
            self.items.append(event)

    def of(self, kind: str) -> list:
        with self.lock:
            return [getattr(e, kind) for e in self.items if e.WhichOneof("event") == kind]


def open_session(runtime: LiveRuntime, sources: list[str], overflow: str = "drop_oldest",
                 limits: LiveLimits | None = None) -> tuple[LiveSession, Events]:
    if limits is not None:
        runtime.limits = limits
    events = Events()
    settings = check_config(sources, SR, "pcm_s16le", overflow, False, "")
    return runtime.open(settings, pb.TranscriptionOptions(), events), events


def feed(session: LiveSession, source: str, audio: np.ndarray, pace: float = 0.0) -> None:
    start = time.monotonic()
    for i in range(0, len(audio), FRAME):
        session.push(source, s16(audio[i:i + FRAME]))
        if pace:
            delay = start + (i + FRAME) / SR / pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)


# --- units: no engine ----------------------------------------------------------------------------

def test_endpoints_fall_on_the_sentence_ends_of_the_reading(lj_audio: np.ndarray) -> None:
    ep = Endpointer(endpoint_ms=300)
    utterances = []
    for i in range(0, len(lj_audio), FRAME):
        utterances += ep.push(i, lj_audio[i:i + FRAME])
    utterances += ep.flush()
    ends = [u.speech_end / SR for u in utterances]
    for _start, end, _ in lj_sentences():
        # every sentence end (0.4 s pauses between them) is an endpoint
        assert min(abs(end - e) for e in ends) < 0.3, (end, ends)
    assert all(a.end <= b.start for a, b in zip(utterances, utterances[1:], strict=False))
    assert max(u.end - u.start for u in utterances) <= 20 * SR


def test_a_long_utterance_is_cut_below_the_limit(lj_audio: np.ndarray) -> None:
    # endpoints only after 5 s of silence: sentences run together and must be cut
    ep = Endpointer(endpoint_ms=5000, max_utterance_s=12.0)
    utterances = []
    for i in range(0, 60 * SR, FRAME):
        utterances += ep.push(i, lj_audio[i:i + FRAME])
    utterances += ep.flush()
    assert len(utterances) >= 4
    assert all(u.end - u.start <= 12 * SR + FRAME for u in utterances)
    assert all(a.end <= b.start for a, b in zip(utterances, utterances[1:], strict=False))


def test_ring_buffer_wraps_and_restarts_after_a_gap() -> None:
    ring = RingBuffer(1000)
    data = np.arange(2500, dtype=np.float32)
    for i in range(0, 2500, 300):
        ring.write(i, data[i:i + 300])
    assert (ring.start, ring.end) == (1500, 2500)
    assert np.array_equal(ring.read(1400, 2600), data[1500:2500])
    ring.write(5000, data[:10])  # audio lost in between: the buffer starts again
    assert (ring.start, ring.end) == (5000, 5010)
    assert len(ring.read(2000, 5005)) == 5


def test_status_is_sent_on_change_repeated_once_a_second_then_recovers() -> None:
    tracker = StatusTracker()
    sent = [tracker.update(fill, 0, now=t) for t, fill in
            [(0.0, 0.1), (0.1, 0.6), (0.5, 0.7), (1.2, 0.7), (1.5, 0.7), (2.3, 0.1)]]
    assert sent == [None, "backpressure", None, "backpressure", None, "ok"]
    assert tracker.update(0.1, 3, now=3.0) == "dropping"
    assert tracker.update(0.1, 0, now=3.5) is None
    assert tracker.update(0.1, 0, now=4.1) == "ok"


def test_bad_config_is_refused_with_a_reason() -> None:
    for args, words in [
        ((["mic"], 44100, "", "", False, ""), "16000"),
        ((["mic"], SR, "mp3", "", False, ""), "encoding"),
        ((["mic", "mic"], SR, "", "", False, ""), "distinct"),
        ((["a b"], SR, "", "", False, ""), "source name"),
        ((["mic"], SR, "", "drop_newest", False, ""), "overflow"),
    ]:
        with pytest.raises(JobError) as err:
            check_config(*args)
        assert err.value.code.name == "INVALID_ARGUMENT" and words in err.value.message


# --- with the engine -----------------------------------------------------------------------------

def test_reading_gives_finals_on_endpoints_with_absolute_times_and_partials(
        runtime: LiveRuntime, lj_audio: np.ndarray) -> None:
    seconds = 27.8  # LJ001-0004 ends at 27.56 s
    session, events = open_session(runtime, ["mic"], overflow="block")
    # "block": pushing faster than real time waits for the engine instead of dropping
    feed(session, "mic", lj_audio[:int(seconds * SR)])
    assert session.finish(timeout=180)
    runtime.end(session, detach=False)
    finals = events.of("final")
    assert finals and [f.utterance for f in finals] == list(range(len(finals)))
    text = " ".join(f.text for f in finals)
    sentences = [s for s in lj_sentences() if s[1] <= seconds]
    reference = " ".join(t for _, _, t in sentences)
    assert wer(reference, text) <= 0.12, text
    # absolute times: each sentence's end lies in some final that ends near it
    for _, end, _ in sentences:
        assert min(abs(f.end - end) for f in finals) < 0.5, end
    for f in finals:
        assert f.segments and all(s.source == "mic" for s in f.segments)
        assert f.start <= f.segments[0].start and f.segments[-1].end <= f.end + 0.01
        words = [w for s in f.segments for w in s.words]
        assert words and all(f.start - 0.01 <= w.start <= w.end <= f.end + 0.01 for w in words)
    assert all(a.end <= b.start for a, b in zip(finals, finals[1:], strict=False))
    assert events.of("started")[0].session_id == session.session_id
    # pushed faster than real time: backpressure, but "block" never drops anything
    states = {s.state for s in events.of("status")}
    assert pb.LIVE_SOURCE_BACKPRESSURE in states and pb.LIVE_SOURCE_DROPPING not in states
    assert session.dropped_frames == 0


def test_two_sources_are_kept_apart(runtime: LiveRuntime) -> None:
    jfk = whisper.audio.load_audio(str(JFK))
    libri = whisper.audio.load_audio(str(TESTDATA / "1221-135766-0002.wav"))
    reference = dict(line.split("\t", 1) for line in
                     (TESTDATA / "refs.tsv").read_text().splitlines())["1221-135766-0002.wav"]
    session, events = open_session(runtime, ["mic", "system"], overflow="block")
    # the second source starts 3 s later and interleaves frame by frame
    libri = np.concatenate([np.zeros(3 * SR, dtype=np.float32), libri])
    n = max(len(jfk), len(libri))
    for i in range(0, n, FRAME):
        if i < len(jfk):
            session.push("mic", s16(jfk[i:i + FRAME]))
        if i < len(libri):
            session.push("system", s16(libri[i:i + FRAME]))
    assert session.finish(timeout=120)
    runtime.end(session, detach=False)
    finals = events.of("final")
    mic = " ".join(f.text for f in finals if f.source == "mic")
    system = " ".join(f.text for f in finals if f.source == "system")
    assert wer(jfk_text(), mic) <= 0.1, mic
    assert wer(reference, system) <= 0.15, system
    # each source's own timeline: the second one's speech starts after its 3 s of silence
    assert min(f.start for f in finals if f.source == "system") >= 2.5
    assert min(f.start for f in finals if f.source == "mic") < 1.0
    end = events.of("end")
    assert not end  # the runtime's end() does not send it (the RPC layer does)
    assert session.positions() == {"mic": len(jfk), "system": len(libri)}
    # each source's next decode is conditioned on its own latest finals, not the other's
    for name, own, other in (("mic", mic, system), ("system", system, mic)):
        context = list(session.sources[name].context)
        assert context and all(t in own and t not in other for t in context), (name, context)
        prompt = session._conditioned(session.options, session.sources[name]).initial_prompt
        assert prompt == " ".join(context)


def test_overflow_drops_the_oldest_audio_and_a_source_that_keeps_overflowing_is_closed(
        runtime: LiveRuntime, lj_audio: np.ndarray) -> None:
    limits = LiveLimits(queue_seconds=4.0, drop_source_after=1.0)
    session, events = open_session(runtime, ["fast", "calm"], limits=limits)
    jfk = whisper.audio.load_audio(str(JFK))
    # "fast" sends 60 s of audio at 30x real time, far more than the engine keeps up with;
    # "calm" sends JFK at real time meanwhile
    fast = threading.Thread(target=feed, args=(session, "fast", lj_audio[:60 * SR], 30.0))
    fast.start()
    feed(session, "calm", jfk, 1.0)
    fast.join()
    assert session.finish(timeout=120)
    runtime.end(session, detach=False)
    status = [s for s in events.of("status") if s.source == "fast"]
    states = [s.state for s in status]
    assert pb.LIVE_SOURCE_DROPPING in states
    # dropping was said at once and repeated while it lasted; the source was closed after
    # drop_source_after, and that last status has the totals
    assert states[-1] == pb.LIVE_SOURCE_DROPPED and "overflowing" in status[-1].message
    assert status[-1].dropped_seconds > 1.0 and status[-1].dropped_frames > 10
    # the dropped audio is the oldest: what reached the engine is the newest
    closed = session.sources["fast"]
    assert closed.queue.dropped_seconds > 1.0 and closed.closed
    # the other source went on and was transcribed
    calm = " ".join(f.text for f in events.of("final") if f.source == "calm")
    assert wer(jfk_text(), calm) <= 0.1, calm
    assert not [s for s in events.of("status") if s.source == "calm"
                and s.state == pb.LIVE_SOURCE_DROPPED]


def test_reject_policy_refuses_new_frames(runtime: LiveRuntime, lj_audio: np.ndarray) -> None:
    session, events = open_session(runtime, ["mic"], overflow="reject",
                                   limits=LiveLimits(queue_seconds=0.5, drop_source_after=60))
    for i in range(0, 20 * SR, FRAME):
        session.push("mic", s16(lj_audio[i:i + FRAME]))
    src = session.sources["mic"]
    assert src.queue.dropped_frames > 0 and src.queue.queue.rejected > 0
    statuses = events.of("status")
    assert any(s.state == pb.LIVE_SOURCE_DROPPING and "refused" in s.message for s in statuses)
    runtime.end(session, detach=False)


def test_bad_frames_are_refused(runtime: LiveRuntime) -> None:
    session, _ = open_session(runtime, ["mic"])
    for source, data, words in [
        ("mic", b"\x00" * 3, "whole number"),
        ("mic", b"\x00" * (2 * 3 * SR), "limit"),
        ("speaker", b"\x00" * 100, "unknown source"),
    ]:
        with pytest.raises(JobError) as err:
            session.push(source, data)
        assert err.value.code.name == "INVALID_ARGUMENT" and words in err.value.message
    runtime.end(session, detach=False)
    assert runtime.open_sessions == 0


def test_reading_transcribed_at_real_time_pace_has_low_final_latency(
        runtime: LiveRuntime, lj_audio: np.ndarray) -> None:
    session, events = open_session(runtime, ["mic"])
    feed(session, "mic", lj_audio[:int(12.2 * SR)], pace=1.0)
    assert session.finish(timeout=60)
    runtime.end(session, detach=False)
    finals = events.of("final")
    latencies = [f.latency_seconds for f in finals]
    # loose: this CPU is shared with other test runs; `make bench-live` measures the real p95
    assert latencies and max(latencies) < 5.0, latencies
    partials = events.of("partial")
    for f in finals:
        if f.end - f.start >= 3.0:  # partials while it was spoken (bench-live: their cadence)
            assert [p for p in partials if p.utterance == f.utterance], f
    for p in partials:  # a partial belongs to an utterance whose final came later
        assert any(f.utterance == p.utterance and f.start <= p.start + 0.01 for f in finals)
    assert session.dropped_frames == 0
    assert wer(" ".join(t for a, b, t in lj_sentences() if b <= 12.2),
               " ".join(f.text for f in events.of("final"))) <= 0.12
    assert lj_text()  # the reference is there


def test_settled_words_are_what_successive_partials_agree_on() -> None:
    assert settled_words("Printing, in the only", "Printing, in the only sense") == \
        "Printing, in the only"
    # punctuation counts: "sense." may still become "sense with"
    assert settled_words("Printing in the only sense.", "Printing in the only sense with") == \
        "Printing in the only"
    assert settled_words("Printing", "Painting in") == ""
    assert settled_words("Printing in") == ""  # one partial agrees with nothing yet

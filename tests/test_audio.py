"""AudioStreamContext against real ffmpeg and the real speech in ../shared/testdata."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from longscribe.service.audio import (
    SAMPLE_RATE,
    AudioChunk,
    AudioStreamContext,
    adaptive_chunk_seconds,
    can_stream_while_growing,
    probe_duration,
)
from longscribe.service.buffers import BufferPool
from longscribe.service.chunk_queue import AudioChunkQueue, OverflowPolicy, QueueClosed
from longscribe.service.errors import Cancelled, JobError

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
JFK = TESTDATA / "jfk.flac"
LJ = TESTDATA / "ljspeech_LJ001-0001_to_0032.flac"

pytestmark = pytest.mark.skipif(not JFK.is_file(), reason="../shared/testdata is not present")


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                   check=True, timeout=120)


def one_shot_decode(path: Path) -> np.ndarray:
    """The whole file in one ffmpeg call: the reference the chunked stream must equal."""
    out = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-map", "0:a:0",
         "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le", "-"],
        check=True, capture_output=True, timeout=120).stdout
    return np.frombuffer(out, dtype="<i2").astype(np.float32) / 32768.0


def ffmpeg_children() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "ffmpeg" in child.name():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def lj_mp3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("media") / "lj.mp3"
    ffmpeg("-i", str(LJ), "-ac", "1", "-ar", "16000", "-c:a", "libmp3lame", "-b:a", "32k",
           str(path))
    return path


@pytest.mark.parametrize("chunk_seconds", [3.0, 1.2345])
def test_jfk_chunks_are_exact_and_contiguous(chunk_seconds: float) -> None:
    reference = one_shot_decode(JFK)
    duration = probe_duration(JFK)
    assert duration is not None
    with AudioStreamContext(JFK, chunk_seconds=chunk_seconds) as ctx:
        chunks = list(ctx.chunks())
        assert ctx.chunk_samples == round(chunk_seconds * SAMPLE_RATE)
    # Stereo 44.1 kHz in, 16 kHz mono out: the sample count matches the container duration.
    total = sum(c.num_samples for c in chunks)
    assert abs(total - duration * SAMPLE_RATE) <= 1
    assert ctx.samples_out == total and ctx.seconds_decoded == pytest.approx(duration, abs=1e-4)
    assert len(chunks) == int(np.ceil(total / ctx.chunk_samples))
    expected_start = 0
    for i, chunk in enumerate(chunks):
        assert chunk.index == i
        assert chunk.start_sample == expected_start
        assert chunk.samples.dtype == np.float32
        if i < len(chunks) - 1:
            assert chunk.num_samples == ctx.chunk_samples
        expected_start = chunk.end_sample
    assert chunks[-1].end == pytest.approx(duration, abs=1 / SAMPLE_RATE)
    joined = np.concatenate([c.samples for c in chunks])
    np.testing.assert_array_equal(joined, reference)


def test_chunk_to_segment_round_trips_the_pcm() -> None:
    with AudioStreamContext(JFK, chunk_seconds=4.0) as ctx:
        chunk = next(iter(ctx.chunks()))
    segment = chunk.to_segment()
    assert (segment.frame_rate, segment.channels, segment.sample_width) == (SAMPLE_RATE, 1, 2)
    assert segment.frame_count() == chunk.num_samples
    pcm = np.array(segment.get_array_of_samples(), dtype=np.float32) / 32768.0
    np.testing.assert_array_equal(pcm, chunk.samples)
    assert segment.dBFS > -40  # real speech, not silence


def test_adaptive_chunk_size_follows_memory() -> None:
    assert adaptive_chunk_seconds(30.0, available_bytes=64 << 30) == 30.0
    small = adaptive_chunk_seconds(30.0, available_bytes=200 << 20)
    assert 1.0 <= small < 30.0
    # 16 chunks of float32 + s16 samples fit in 5 % of the memory given.
    assert 16 * small * SAMPLE_RATE * 6 <= 0.05 * (200 << 20) + 1
    assert adaptive_chunk_seconds(30.0, available_bytes=1 << 20) == 1.0


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"this is a plain text file, not audio\n" * 50, "not a media file ffmpeg can decode"),
     (b"", "empty"),
     (b"RIFF" + bytes(range(256)) * 400, "not a media file ffmpeg can decode")],
    ids=["text", "empty", "corrupt-wav"],
)
def test_bad_input_is_invalid_argument(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "upload.mp3"
    path.write_bytes(content)
    with pytest.raises(JobError) as info, AudioStreamContext(path) as ctx:
        list(ctx.chunks())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.message
    assert not ffmpeg_children()


def test_video_without_audio_is_invalid_argument(tmp_path: Path) -> None:
    video = tmp_path / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=5:duration=1", str(video))
    with pytest.raises(JobError) as info, AudioStreamContext(video) as ctx:
        list(ctx.chunks())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no audio stream" in info.value.message


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(JobError) as info, AudioStreamContext(tmp_path / "nope.wav"):
        pass
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_cancel_mid_stream_kills_ffmpeg_and_removes_work_dir() -> None:
    cancel = threading.Event()
    seen = 0
    with pytest.raises(Cancelled), AudioStreamContext(LJ, chunk_seconds=1.0, cancel=cancel) as ctx:
        work_dir = ctx.work_dir
        assert work_dir is not None and work_dir.is_dir()
        pid = ctx.pid
        for _chunk in ctx.chunks():
            seen += 1
            if seen == 2:
                assert pid in [p.pid for p in ffmpeg_children()]
                cancel.set()
    assert seen == 2
    assert not work_dir.exists()
    assert not ffmpeg_children()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_exception_inside_with_cleans_up(tmp_path: Path) -> None:
    given = tmp_path / "job-tmp"
    given.mkdir()
    with pytest.raises(RuntimeError, match="consumer broke"):  # noqa: SIM117 (shows the order)
        with AudioStreamContext(LJ, chunk_seconds=1.0, work_dir=given) as ctx:
            (given / "scratch.bin").write_bytes(b"x")
            for _chunk in ctx.chunks():
                raise RuntimeError("consumer broke")
    assert not ffmpeg_children()
    # A work_dir the caller gave belongs to the caller: kept, contents untouched.
    assert (given / "scratch.bin").is_file()

    with pytest.raises(RuntimeError), AudioStreamContext(LJ, chunk_seconds=1.0) as ctx:
        own = ctx.work_dir
        next(iter(ctx.chunks()))
        raise RuntimeError("boom")
    assert own is not None and not own.exists()
    assert not ffmpeg_children()

    made = tmp_path / "made-here"  # did not exist: the context creates it, so removes it
    with pytest.raises(RuntimeError), AudioStreamContext(JFK, work_dir=made) as ctx:
        assert made.is_dir()
        raise RuntimeError("boom")
    assert not made.exists()


def test_growing_file_decodes_while_written(tmp_path: Path, lj_mp3: Path) -> None:
    target = tmp_path / "incoming.mp3"
    data = lj_mp3.read_bytes()
    done = threading.Event()

    def writer() -> None:
        pieces = 40
        step = len(data) // pieces + 1
        with target.open("wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(0.04)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    first_chunk_while_writing = None
    samples = []
    try:
        with AudioStreamContext(target, chunk_seconds=5.0, growing=done) as ctx:
            for chunk in ctx.chunks():
                if first_chunk_while_writing is None:
                    first_chunk_while_writing = not done.is_set()
                samples.append(chunk.samples)
    finally:
        thread.join()
    assert first_chunk_while_writing, "decoding should start before the writer finishes"
    assert ctx.bytes_in == len(data)
    reference = one_shot_decode(lj_mp3)
    decoded = np.concatenate(samples)
    # From a pipe ffmpeg cannot trim the encoder's end padding (it is known only from a
    # seekable file): the same samples, then at most one mp3 frame (1152 samples) of padding.
    assert 0 <= len(decoded) - len(reference) <= 1152
    np.testing.assert_array_equal(decoded[: len(reference)], reference)
    assert not ffmpeg_children()


def test_growing_file_cancel_while_waiting_for_data(tmp_path: Path, lj_mp3: Path) -> None:
    target = tmp_path / "stalled.mp3"
    target.write_bytes(lj_mp3.read_bytes()[:20000])  # the writer stalls after a few frames
    done, cancel = threading.Event(), threading.Event()
    with pytest.raises(Cancelled), AudioStreamContext(  # noqa: PT012
        target, chunk_seconds=1.0, growing=done, cancel=cancel
    ) as ctx:
        chunks = ctx.chunks()
        next(chunks)
        threading.Timer(0.3, cancel.set).start()
        started = time.monotonic()
        for _ in chunks:
            pass
    assert time.monotonic() - started < 2.0
    assert not ffmpeg_children()


def test_container_streamability(tmp_path: Path) -> None:
    for name in ("a.mp3", "b.wav", "c.ogg", "d.webm", "e.mkv", "f.flac"):
        assert can_stream_while_growing(name)
    assert not can_stream_while_growing("g.m4a")
    plain, fragmented = tmp_path / "plain.m4a", tmp_path / "frag.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(plain))
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac",
           "-movflags", "frag_keyframe+empty_moov", str(fragmented))
    assert not can_stream_while_growing(plain)
    assert can_stream_while_growing(fragmented)


def test_buffer_pool_reuses_without_overwriting_held_chunks() -> None:
    reference = one_shot_decode(LJ)[: 40 * SAMPLE_RATE]
    pool = BufferPool(buffer_samples=SAMPLE_RATE, max_buffers=3)
    held = None
    with AudioStreamContext(LJ, chunk_seconds=30.0, buffer_pool=pool) as ctx:
        assert ctx.chunk_samples == SAMPLE_RATE  # clamped to the pool's buffer size
        for chunk in ctx.chunks():
            if chunk.index == 0:
                held = chunk  # kept for the whole decode, never released
                continue
            expected = reference[chunk.start_sample:chunk.end_sample]
            np.testing.assert_array_equal(chunk.samples, expected)
            chunk.release()
            assert chunk.num_samples == 0
            if chunk.index == 39:
                break
    assert held is not None
    np.testing.assert_array_equal(held.samples, reference[:SAMPLE_RATE])
    assert pool.allocations <= 3
    assert pool.reuses >= 35


def test_pooled_chunks_through_a_blocking_queue() -> None:
    """Decoder thread -> bounded BLOCK queue -> consumer, with pooled buffers: every sample
    arrives intact and in order while a handful of buffers are recycled."""
    reference = one_shot_decode(LJ)
    pool = BufferPool(buffer_samples=2 * SAMPLE_RATE, max_buffers=4)
    q: AudioChunkQueue[AudioChunk] = AudioChunkQueue(2, OverflowPolicy.BLOCK, name="decode")
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with AudioStreamContext(LJ, buffer_pool=pool) as ctx:
                for chunk in ctx.chunks():
                    q.put(chunk)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            failure.append(e)
        finally:
            q.close()

    producer = threading.Thread(target=produce)
    producer.start()
    expected_start = 0
    while True:
        try:
            chunk = q.get(timeout=30)
        except QueueClosed:
            break
        assert chunk.start_sample == expected_start
        np.testing.assert_array_equal(chunk.samples, reference[expected_start:chunk.end_sample])
        expected_start = chunk.end_sample
        chunk.release()
        del chunk
    producer.join(timeout=30)
    assert not failure
    assert expected_start == len(reference)
    assert pool.allocations <= 4 and pool.reuses > 100


def _decode_peak_rss(path: Path) -> tuple[int, float, float]:
    """Decode `path`, discarding chunks; return (peak RSS sampled every 20 ms, audio seconds,
    wall seconds)."""
    process = psutil.Process()
    peak = [process.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        with AudioStreamContext(path, chunk_seconds=30.0) as ctx:
            for chunk in ctx.chunks():
                del chunk  # the consumer discards
    finally:
        stop.set()
        sampler.join()
    return peak[0], ctx.seconds_decoded, time.monotonic() - started


@pytest.mark.slow
def test_three_hour_mp3_decodes_in_bounded_memory(tmp_path: Path, lj_mp3: Path) -> None:
    # Tile the 234 s mp3 by stream copy (no re-encode): 3 h of 32 kbps mono in ~1-2 s.
    ten_min, three_h = tmp_path / "ten_minutes.mp3", tmp_path / "three_hours.mp3"
    for path, seconds in ((ten_min, 600), (three_h, 10800)):
        ffmpeg("-stream_loop", "-1", "-i", str(lj_mp3), "-c", "copy", "-t", str(seconds),
               str(path))
    assert three_h.stat().st_size > 40_000_000
    # Warm up (imports, first buffers), then measure each decode's peak against the baseline.
    with AudioStreamContext(JFK) as warm:
        for _ in warm.chunks():
            pass
    baseline = psutil.Process().memory_info().rss
    peak_10m, audio_10m, _ = _decode_peak_rss(ten_min)
    peak_3h, audio_3h, wall_3h = _decode_peak_rss(three_h)
    assert audio_10m == pytest.approx(600.0, abs=1.0)
    assert audio_3h == pytest.approx(10800.0, abs=1.0)
    growth_mb = (peak_3h - baseline) / 1e6
    print(f"3 h mp3: decoded in {wall_3h:.1f} s ({audio_3h / wall_3h:.0f}x real time); RSS "
          f"baseline {baseline / 1e6:.0f} MB, peak 10 min {peak_10m / 1e6:.0f} MB, peak 3 h "
          f"{peak_3h / 1e6:.0f} MB, growth {growth_mb:.1f} MB")
    assert growth_mb < 100  # a whole 3 h float32 decode would be 691 MB
    assert peak_3h <= 1.1 * peak_10m
@pytest.fixture(autouse=True)
def _no_ffmpeg_left() -> Iterator[None]:
    yield
    assert not ffmpeg_children()

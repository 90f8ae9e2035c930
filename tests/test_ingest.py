"""ChunkStream: real ffmpeg, a real bounded queue between threads, metrics over real HTTP."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from longscribe.service import metrics as m
from longscribe.service.audio import SAMPLE_RATE, AudioChunk, AudioStreamContext
from longscribe.service.errors import Cancelled, JobError
from longscribe.service.ingest import ChunkStream
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LJ, require_testdata


@pytest.fixture(autouse=True)
def _testdata_and_no_ffmpeg_left() -> Iterator[None]:
    require_testdata()
    yield
    assert not ffmpeg_children()


@pytest.fixture
def metrics() -> m.Metrics:
    return m.Metrics()  # a registry per test: counts start at zero


def ffmpeg_children() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "ffmpeg" in child.name():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def job_id() -> str:
    return uuid.uuid4().hex


def direct_chunks(path: Path, chunk_seconds: float) -> list[tuple[int, int, np.ndarray]]:
    with AudioStreamContext(path, chunk_seconds=chunk_seconds) as ctx:
        return [(c.index, c.start_sample, c.samples.copy()) for c in ctx.chunks()]


def series(metrics: m.Metrics, queue: str) -> list[str]:
    """Names of the samples in the registry labelled with this queue."""
    return [s.name for family in metrics.registry.collect() for s in family.samples
            if s.labels.get("queue") == queue]


def wait_until_blocked(stream: ChunkStream, settle: float = 0.3, timeout: float = 10.0) -> None:
    """Until the producer has stopped decoding (its count unchanged for `settle` s)."""
    deadline = time.monotonic() + timeout
    last, since = stream.samples_decoded, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = stream.samples_decoded
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return
    raise AssertionError("the producer never stopped: no backpressure")


def test_chunks_equal_the_direct_decode(metrics: m.Metrics) -> None:
    direct = direct_chunks(LJ, 5.0)
    with ChunkStream(LJ, job_id=job_id(), chunk_seconds=5.0, max_queue_seconds=20.0,
                     metrics=metrics) as stream:
        assert stream.queue.maxsize == 4  # 20 s of 5 s chunks
        streamed = [(c.index, c.start_sample, c.samples) for c in stream.chunks()]
        assert stream.join_producer(2.0)
    assert len(streamed) == len(direct) > 40
    for (i, start, samples), (j, start2, samples2) in zip(streamed, direct, strict=True):
        assert (i, start) == (j, start2)
        np.testing.assert_array_equal(samples, samples2)
    total = sum(len(s) for _, _, s in direct)
    decoded = metrics.registry.get_sample_value("longscribe_audio_decoded_seconds_total")
    assert decoded == pytest.approx(total / SAMPLE_RATE)
    assert stream.blocked_seconds > 0  # ffmpeg outran the list building: the queue filled


def test_growing_file_streams_and_counts_received_bytes(tmp_path: Path,
                                                        metrics: m.Metrics) -> None:
    data = LJ.read_bytes()
    target = tmp_path / "incoming.flac"
    done = threading.Event()

    def writer() -> None:
        step = len(data) // 20 + 1
        with target.open("wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(0.03)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with ChunkStream(target, job_id=job_id(), chunk_seconds=5.0, growing=done,
                         received_source="download", metrics=metrics) as stream:
            chunks = []
            first_while_writing = None
            for c in stream.chunks():
                if first_while_writing is None:
                    first_while_writing = not done.is_set()
                chunks.append(c)
    finally:
        thread.join()
    assert first_while_writing
    streamed = np.concatenate([c.samples for c in chunks])
    reference = np.concatenate([s for _, _, s in direct_chunks(LJ, 5.0)])
    np.testing.assert_array_equal(streamed, reference)  # flac from a pipe is sample-exact
    received = metrics.registry.get_sample_value(
        "longscribe_audio_bytes_received_total", {"source": "download"})
    assert received == len(data)


def test_backpressure_bounds_the_queue_and_stalls_ffmpeg(metrics: m.Metrics) -> None:
    chunk = SAMPLE_RATE  # 1 s chunks, a 4 s queue: 4 chunks, 256 000 bytes
    samples: list[tuple[int, int, int]] = []  # (depth, bytes, decoded - consumed) over time
    consumed = [0]
    stop = threading.Event()

    with ChunkStream(LJ, job_id=job_id(), chunk_seconds=1.0, max_queue_seconds=4.0,
                     metrics=metrics) as stream:
        assert stream.chunk_samples == chunk and stream.max_bytes == 4 * chunk * 4

        def monitor() -> None:
            q = stream.queue
            while not stop.is_set():
                # decoded first, then consumed: the difference can only under-read.
                decoded = stream.samples_decoded
                samples.append((len(q), q.nbytes, decoded - consumed[0]))
                time.sleep(0.002)

        watcher = threading.Thread(target=monitor)
        watcher.start()
        try:
            it = stream.chunks()
            first = next(it)
            consumed[0] = first.end_sample
            wait_until_blocked(stream)
            # Stalled: 4 chunks queued, 1 in the producer's hand, nothing more read from ffmpeg.
            assert len(stream.queue) == 4
            assert stream.samples_decoded - consumed[0] == 5 * chunk
            ffmpeg = psutil.Process(stream.ffmpeg_pid)
            cpu_before = sum(ffmpeg.cpu_times()[:2])
            decoded_before = stream.samples_decoded
            time.sleep(1.0)
            # ffmpeg is alive, asleep in a write to the full pipe, and burns no CPU: it has
            # 230 s of audio left that it would decode in well under a second unthrottled.
            assert ffmpeg.status() == psutil.STATUS_SLEEPING
            assert sum(ffmpeg.cpu_times()[:2]) - cpu_before < 0.05
            assert stream.samples_decoded == decoded_before
            expected_start = first.end_sample
            for c in it:  # a slow consumer for the rest
                assert c.start_sample == expected_start
                expected_start = consumed[0] = c.end_sample
                time.sleep(0.001)
        finally:
            stop.set()
            watcher.join()
    assert expected_start > 200 * SAMPLE_RATE  # the whole file came through
    depths = [d for d, _, _ in samples]
    assert max(depths) == 4  # the bound was reached, never passed
    assert max(b for _, b, _ in samples) <= stream.max_bytes
    assert max(a for _, _, a in samples) <= 5 * chunk
    assert len(samples) > 200
    assert stream.blocked_seconds > 1.0


def test_producer_error_surfaces_as_the_same_job_error(tmp_path: Path,
                                                       metrics: m.Metrics) -> None:
    bad = tmp_path / "upload.mp3"
    bad.write_bytes(b"this is a plain text file, not audio\n" * 50)
    with pytest.raises(JobError) as direct, AudioStreamContext(bad) as ctx:
        list(ctx.chunks())
    name = ""
    with pytest.raises(JobError) as streamed, ChunkStream(  # noqa: PT012
            bad, job_id=job_id(), metrics=metrics) as stream:
        name = stream.queue.name
        for _ in stream.chunks():
            pass
    assert type(streamed.value) is JobError
    assert streamed.value.code == direct.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert streamed.value.message == direct.value.message
    assert not stream.producer_alive
    assert name and not series(metrics, name)

    # Errors opening the source raise from `with`, as AudioStreamContext's do.
    with pytest.raises(JobError) as missing, ChunkStream(tmp_path / "nope.wav", job_id=job_id(),
                                                         metrics=metrics):
        pass
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_producer_error_mid_stream_comes_after_the_decoded_chunks(metrics: m.Metrics) -> None:
    # ffmpeg killed mid-stream (as the OOM killer would): every chunk it wrote still reaches
    # the consumer, in order, and then the producer's JobError does.
    got: list[AudioChunk] = []
    with pytest.raises(JobError) as info, ChunkStream(  # noqa: PT012
            LJ, job_id=job_id(), chunk_seconds=1.0, max_queue_seconds=4.0,
            metrics=metrics) as stream:
        it = stream.chunks()
        got.append(next(it))
        wait_until_blocked(stream)
        pid = stream.ffmpeg_pid
        assert pid is not None
        psutil.Process(pid).kill()
        for c in it:
            got.append(c)
    assert type(info.value) is JobError
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    seconds = stream.samples_decoded / SAMPLE_RATE
    assert info.value.message.startswith(f"ffmpeg failed after {seconds:.1f} s of audio")
    assert [c.index for c in got] == list(range(len(got)))
    assert got[-1].end_sample == stream.samples_decoded > 10 * SAMPLE_RATE  # the pipe's share
    assert seconds < 200  # killed well before the end


@pytest.mark.parametrize("where", ["producer-blocked", "consumer-starved"])
def test_cancel_mid_stream_stops_both_sides(where: str, tmp_path: Path,
                                            metrics: m.Metrics) -> None:
    cancel = threading.Event()
    growing = None
    source = LJ
    if where == "consumer-starved":
        # A download that stalls: the producer waits on ffmpeg, the consumer on the queue.
        source = tmp_path / "stalled.flac"
        source.write_bytes(LJ.read_bytes()[:100_000])
        growing = threading.Event()
    cancelled_at = [0.0]

    def do_cancel() -> None:
        cancelled_at[0] = time.monotonic()
        cancel.set()

    with ChunkStream(source, job_id=job_id(), chunk_seconds=1.0, max_queue_seconds=4.0,
                     cancel=cancel, growing=growing, metrics=metrics) as stream:
        pid = stream.ffmpeg_pid
        work_dir = stream.work_dir
        it = stream.chunks()
        next(it)
        wait_until_blocked(stream)
        assert pid in [p.pid for p in ffmpeg_children()]
        if where == "producer-blocked":
            assert len(stream.queue) == 4  # a backlog the consumer must not wait through
        else:
            while len(stream.queue):  # take what the stalled download gave
                next(it)
            assert stream.producer_alive and not growing.is_set()
        timer = threading.Timer(0.2, do_cancel)
        timer.start()
        with pytest.raises(Cancelled):
            for _ in it:
                time.sleep(0.1)  # a consumer busy with each chunk
        raised_after = time.monotonic() - cancelled_at[0]
        assert raised_after < 0.5
        # The producer stops on its own (before any __exit__): thread ended, ffmpeg reaped.
        assert stream.join_producer(0.5 - (time.monotonic() - cancelled_at[0]))
        assert not ffmpeg_children()
        timer.join()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert work_dir is not None and not work_dir.exists()
    assert not series(metrics, stream.queue.name)
    if where == "producer-blocked":
        dropped = metrics.registry.get_sample_value(
            "longscribe_chunks_dropped_total", {"queue": "decode", "reason": "cancelled"})
        assert dropped == 4


@pytest.mark.parametrize("consumer", ["busy-with-backlog", "waiting-in-get"])
def test_close_from_another_thread_never_looks_like_the_end(consumer: str, tmp_path: Path,
                                                            metrics: m.Metrics) -> None:
    """The server's consumer is the engine's feeder thread, while `with` exits in the pipeline
    thread: a close under a running consumer must reach it as Cancelled, not as a short but
    complete stream."""
    source, growing = LJ, None
    if consumer == "waiting-in-get":
        source = tmp_path / "stalled.flac"
        source.write_bytes(LJ.read_bytes()[:100_000])
        growing = threading.Event()
    outcome: list[BaseException | str] = []
    got_one, hold = threading.Event(), threading.Event()
    stream = ChunkStream(source, job_id=job_id(), chunk_seconds=1.0, max_queue_seconds=4.0,
                         growing=growing, metrics=metrics)

    def consume() -> None:
        try:
            for _ in stream.chunks():
                got_one.set()
                if consumer == "busy-with-backlog":
                    hold.wait(10)  # busy with this chunk until the close has happened
            outcome.append("ended normally")
        except BaseException as e:  # noqa: BLE001 - inspected below
            outcome.append(e)

    with stream:
        reader = threading.Thread(target=consume)
        reader.start()
        assert got_one.wait(10)
        wait_until_blocked(stream)
        backlog = len(stream.queue)
        assert backlog == (4 if consumer == "busy-with-backlog" else 0)
        started = time.monotonic()
    closed_in = time.monotonic() - started
    hold.set()
    reader.join(2.0)
    assert not reader.is_alive()
    assert closed_in < 0.5  # producer joined, ffmpeg killed and reaped
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
    assert not stream.producer_alive and not ffmpeg_children()
    dropped = metrics.registry.get_sample_value(
        "longscribe_chunks_dropped_total", {"queue": "decode", "reason": "closed"})
    assert (dropped or 0) == backlog
    assert not series(metrics, stream.queue.name)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_shows_the_decode_queue_while_it_runs(metrics: m.Metrics) -> None:
    total = sum(len(s) for _, _, s in direct_chunks(LJ, 2.0))
    server, port = m.start_metrics_server(0, metrics=metrics)
    jid = job_id()
    queue = ("queue", f"decode:{jid[:8]}")
    try:
        with ChunkStream(LJ, job_id=jid, chunk_seconds=2.0, max_queue_seconds=8.0,
                         metrics=metrics) as stream:
            it = stream.chunks()
            taken = [next(it)]
            wait_until_blocked(stream)
            full = scrape(port)
            # Consume to within 6 s of the end (not the last chunk): the rest fits in the
            # queue, so the producer finishes; then drain to one chunk left.
            chunk: AudioChunk | None = None
            for chunk in it:
                taken.append(chunk)
                if chunk.end_sample >= total - 6 * SAMPLE_RATE:
                    break
            assert chunk is not None and chunk.end_sample < total
            assert stream.join_producer(5.0)
            while len(stream.queue) > 1:
                taken.append(next(it))
            last = stream.queue.peek()
            assert last is not None
            near_end = scrape(port)
        after = scrape(port)
    finally:
        m.stop_metrics_server(server)

    assert full[("longscribe_queue_depth", (queue,))] == 4
    assert full[("longscribe_queue_bytes", (queue,))] == 4 * 2 * SAMPLE_RATE * 4
    assert near_end[("longscribe_queue_depth", (queue,))] == 1
    assert near_end[("longscribe_queue_bytes", (queue,))] == last.nbytes
    waits = ("longscribe_chunk_wait_seconds_count", (("queue", "decode"),))
    assert full[waits] == 1 and near_end[waits] == len(taken)
    decoded = "longscribe_audio_decoded_seconds_total", ()
    assert full[decoded] < near_end[decoded] == pytest.approx(total / SAMPLE_RATE)
    # After exit the per-job series are gone; the stable group keeps the history.
    assert not [k for k in after if queue in k[1]]
    assert after[waits] == len(taken)
    assert after[("longscribe_chunks_dropped_total",
                  (("queue", "decode"), ("reason", "closed")))] == 1

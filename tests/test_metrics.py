"""The Prometheus endpoint, scraped over real HTTP on 127.0.0.1."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import psutil
import pytest
import torch
from longscribe.service import metrics as m
from longscribe.service.chunk_queue import AudioChunkQueue, OverflowPolicy
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def served() -> Iterator[tuple[m.Metrics, int]]:
    metrics = m.Metrics()
    server, port = m.start_metrics_server(0, metrics=metrics)
    try:
        yield metrics, port
    finally:
        m.stop_metrics_server(server)


def test_series_are_served_and_change_between_scrapes(served: tuple[m.Metrics, int]) -> None:
    metrics, port = served
    observer = m.QueueMetricsObserver(metrics)
    q: AudioChunkQueue[bytes] = AudioChunkQueue(2, OverflowPolicy.DROP_OLDEST, name="live",
                                                observer=observer)
    metrics.set_jobs_by_state({"JOB_STATE_QUEUED": 3, "JOB_STATE_TRANSCRIBING": 1})
    for _ in range(3):
        q.put(b"x" * 100)  # the third evicts the first
    q.get()  # depth 1, 100 bytes, one wait observed
    metrics.add_audio_bytes(1000)
    metrics.observe_chunk_processing(0.2)
    metrics.set_realtime_factor(10.0)
    first = scrape(port)

    metrics.set_jobs_by_state({"JOB_STATE_QUEUED": 1, "JOB_STATE_TRANSCRIBING": 3})
    q.put(b"y" * 300)
    q.put(b"y" * 300)  # evicts
    q.get()
    q.put(b"y" * 300)
    q.put(b"y" * 300)  # evicts: depth 2, 600 bytes, 3 dropped, 2 waits
    metrics.add_audio_bytes(500, source="download")
    metrics.add_audio_bytes(24)
    metrics.observe_chunk_processing(0.4)
    metrics.set_realtime_factor(42.5)
    second = scrape(port)

    def changed(name: str, **labels: str) -> tuple[float, float]:
        key = (name, tuple(sorted(labels.items())))
        assert key in first and key in second, f"{key} not scraped"
        assert first[key] != second[key], f"{key} did not change"
        return first[key], second[key]

    assert changed("longscribe_jobs", state="JOB_STATE_QUEUED") == (3, 1)
    assert changed("longscribe_jobs", state="JOB_STATE_TRANSCRIBING") == (1, 3)
    assert changed("longscribe_queue_depth", queue="live") == (1, 2)
    assert changed("longscribe_queue_bytes", queue="live") == (100, 600)
    assert changed("longscribe_chunk_wait_seconds_count", queue="live") == (1, 2)
    assert changed("longscribe_chunks_dropped_total", queue="live", reason="overflow") == (1, 3)
    assert changed("longscribe_audio_bytes_received_total", source="upload") == (1000, 1024)
    assert second[("longscribe_audio_bytes_received_total", (("source", "download"),))] == 500
    assert changed("longscribe_chunk_processing_seconds_count") == (1, 2)
    assert changed("longscribe_chunk_processing_seconds_sum") == pytest.approx((0.2, 0.6))
    assert changed("longscribe_realtime_factor") == (10.0, 42.5)
    # RSS is read at scrape time: it must be this process's (other tests in the same process
    # leave freed, still-resident heap behind, so a ballast need not move it).
    rss = second[("longscribe_process_resident_memory_bytes", ())]
    assert abs(rss - psutil.Process().memory_info().rss) < 0.2 * rss


def test_two_servers_keep_separate_registries() -> None:
    a, b = m.Metrics(), m.Metrics()
    server_a, port_a = m.start_metrics_server(0, metrics=a)
    server_b, port_b = m.start_metrics_server(0, metrics=b)
    try:
        assert port_a != port_b
        a.add_audio_bytes(7)
        key = ("longscribe_audio_bytes_received_total", (("source", "upload"),))
        assert scrape(port_a)[key] == 7
        assert key not in scrape(port_b)
    finally:
        m.stop_metrics_server(server_a)
        m.stop_metrics_server(server_b)


def test_module_functions_feed_the_default_server() -> None:
    server, port = m.start_metrics_server(0)
    try:
        key = ("longscribe_audio_bytes_received_total", (("source", "upload"),))
        before = scrape(port).get(key, 0.0)
        m.add_audio_bytes(123)
        m.set_jobs_by_state({"JOB_STATE_FAILED": 5})
        after = scrape(port)
        assert after[key] == before + 123
        assert after[("longscribe_jobs", (("state", "JOB_STATE_FAILED"),))] == 5
    finally:
        m.stop_metrics_server(server)


def test_engine_and_decode_series(served: tuple[m.Metrics, int]) -> None:
    metrics, port = served
    metrics.observe_window_batch(0.5, 8)
    metrics.add_decoded_audio(30.0)
    first = scrape(port)
    metrics.observe_window_batch(1.5, 3)
    metrics.observe_window_batch(0.1, 0)  # an empty batch still took time, adds no windows
    metrics.add_decoded_audio(12.5)
    metrics.add_decoded_audio(-1.0)  # ignored: a counter never goes down
    second = scrape(port)
    assert first[("longscribe_windows_transcribed_total", ())] == 8
    assert second[("longscribe_windows_transcribed_total", ())] == 11
    assert second[("longscribe_window_batch_size_count", ())] == 2
    assert second[("longscribe_window_batch_size_bucket", (("le", "4.0"),))] == 1
    assert second[("longscribe_window_batch_size_bucket", (("le", "8.0"),))] == 2
    assert second[("longscribe_chunk_processing_seconds_count", ())] == 3
    assert second[("longscribe_chunk_processing_seconds_sum", ())] == pytest.approx(2.1)
    assert first[("longscribe_audio_decoded_seconds_total", ())] == 30.0
    assert second[("longscribe_audio_decoded_seconds_total", ())] == 42.5


def test_grouped_observer_forgets_a_finished_queue(served: tuple[m.Metrics, int]) -> None:
    metrics, port = served
    observer = m.QueueMetricsObserver(metrics, group="decode")
    q: AudioChunkQueue[bytes] = AudioChunkQueue(4, OverflowPolicy.BLOCK, name="decode:job1",
                                                observer=observer)
    q.put(b"a" * 10)
    q.put(b"b" * 20)
    q.get()
    during = scrape(port)
    assert during[("longscribe_queue_depth", (("queue", "decode:job1"),))] == 1
    assert during[("longscribe_queue_bytes", (("queue", "decode:job1"),))] == 20
    # The per-job name labels only the gauges; waits and drops go under the stable group.
    assert during[("longscribe_chunk_wait_seconds_count", (("queue", "decode"),))] == 1
    assert not any(labels == (("queue", "decode:job1"),) for name, labels in during
                   if name.startswith("longscribe_chunk_wait"))
    q.close()
    q.flush(reason="closed")
    observer.forget("decode:job1")
    observer.on_put("decode:job1", 3, 30)  # a late hook must not bring the series back
    after = scrape(port)
    assert not any(dict(labels).get("queue") == "decode:job1" for _, labels in after)
    assert after[("longscribe_chunks_dropped_total",
                  (("queue", "decode"), ("reason", "closed")))] == 1
    observer.forget("never-seen")  # forgetting an unknown queue is harmless


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_is_reported(served: tuple[m.Metrics, int]) -> None:
    _, port = served
    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    samples = scrape(port)
    allocated = samples[("longscribe_gpu_memory_allocated_bytes", (("device", "0"),))]
    reserved = samples[("longscribe_gpu_memory_reserved_bytes", (("device", "0"),))]
    assert allocated >= 64 << 20 and reserved >= allocated
    del block
    torch.cuda.empty_cache()
    after = scrape(port)
    peak = after[("longscribe_gpu_memory_max_allocated_bytes", (("device", "0"),))]
    # The block is freed but the peak remembers it.
    assert after[("longscribe_gpu_memory_allocated_bytes", (("device", "0"),))] < peak
    assert peak >= 64 << 20


def test_job_series_from_a_real_server(tmp_path) -> None:
    """Jobs that succeed and fail, counted by end state and code, with run and queue-wait
    histograms and the standard process series; no label carries a job id."""
    import urllib.request

    from longscribe.client.client import LongscribeClient
    from longscribe.client.errors import LongscribeError

    from tests.conftest import JFK, ServerProcess, free_port

    port = free_port()
    server = ServerProcess(tmp_path / "data", "--metrics-port", str(port)).start(timeout=300)
    try:
        bad = tmp_path / "notes.mp3"
        bad.write_text("not audio\n" * 100)
        with LongscribeClient(server.target, timeout=60) as client:
            good = client.submit(JFK)
            client.wait(good.job_id)
            with pytest.raises(LongscribeError):
                client.transcribe(bad)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = text.decode()
    finally:
        server.stop()
    assert 'longscribe_jobs_finished_total{state="succeeded"} 1.0' in text
    assert 'longscribe_jobs_finished_total{state="failed"} 1.0' in text
    assert 'longscribe_jobs_failed_total{code="INVALID_ARGUMENT"} 1.0' in text
    assert "longscribe_job_duration_seconds_count 2.0" in text
    assert "longscribe_job_queue_wait_seconds_count 2.0" in text
    assert "process_cpu_seconds_total" in text and "process_open_fds" in text
    assert good.job_id not in text

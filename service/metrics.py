"""Prometheus metrics for the server, on a registry of our own (not prometheus_client's global
one, so tests can run several servers in one process).

API (module-level calls go to the process-wide `default()` instance; a `Metrics` object has the
same methods for code that wants its own registry):

- `set_jobs_by_state({"JOB_STATE_QUEUED": 2, ...})`   gauge longscribe_jobs{state}
- `add_audio_bytes(n, source="upload")`               counter longscribe_audio_bytes_received_total
- `observe_chunk_processing(seconds)`                 histogram longscribe_chunk_processing_seconds
- `observe_window_batch(seconds, windows)`            the same histogram (one batch), plus
  counter longscribe_windows_transcribed_total and histogram longscribe_window_batch_size
- `set_realtime_factor(x)`                            gauge longscribe_realtime_factor
- `set_engine_degradation(level, direction)`          gauge longscribe_engine_degradation_level,
  counter longscribe_engine_degradation_steps_total{direction}
- `add_decoded_audio(seconds)`                        counter longscribe_audio_decoded_seconds_total
- `QueueMetricsObserver(metrics=None, group=None)`: pass as `AudioChunkQueue(observer=...)`; feeds
  longscribe_queue_depth{queue}, longscribe_queue_bytes{queue},
  longscribe_chunk_wait_seconds{queue} (histogram), longscribe_chunks_dropped_total{queue,reason};
  with `group`, the histogram and the drop counter are labelled with the group instead of the
  queue's own name (per-job queues must not leave a histogram per job), and `forget(queue)`
  removes the queue's depth/bytes series when the queue is done
- live audio (no per-session labels): `add_audio_bytes(n, source="live")` for frame bytes,
  `live_session_opened()` / `live_session_closed()` (gauge longscribe_live_sessions),
  `add_live_dropped(frames, reason)` (counter longscribe_live_frames_dropped_total{reason}:
  overflow, rejected, stale, source_dropped), `observe_live_final_latency(seconds)` (histogram
  longscribe_live_final_latency_seconds: a source's last speech received → its final sent)
- collected at scrape time: longscribe_process_resident_memory_bytes (psutil) and, when torch is
  loaded with CUDA, longscribe_gpu_memory_{allocated,reserved,max_allocated}_bytes{device}
- the remote engine (service/remote_engine.py) sets its longscribe_remote_* series on the
  instance directly: requests by outcome, request time, failures, the circuit's state and
  openings, in-flight requests, queue wait, rate-limit waits, degradation level and steps
- `start_metrics_server(port, addr="127.0.0.1", metrics=None) -> (server, actual_port)`:
  /metrics over HTTP in a daemon thread (port 0 picks a free one); stop it with
  `stop_metrics_server(server)`.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Mapping
from wsgiref.simple_server import WSGIServer

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PROCESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10, 30)
_JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)


class _GpuCollector(Collector):
    """GPU memory per device, read at scrape time; silent unless torch is already imported
    (metrics must not pull torch into processes that do not use it) and CUDA is up."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        allocated = GaugeMetricFamily(
            "longscribe_gpu_memory_allocated_bytes", "GPU memory held by tensors",
            labels=["device"])
        reserved = GaugeMetricFamily(
            "longscribe_gpu_memory_reserved_bytes", "GPU memory reserved by torch's allocator",
            labels=["device"])
        # The peak since start (or the last torch.cuda.reset_peak_memory_stats): what a
        # benchmark wants, since a scrape between batches misses the transient high.
        peak = GaugeMetricFamily(
            "longscribe_gpu_memory_max_allocated_bytes", "Peak GPU memory held by tensors",
            labels=["device"])
        for i in range(torch.cuda.device_count()):
            allocated.add_metric([str(i)], float(torch.cuda.memory_allocated(i)))
            reserved.add_metric([str(i)], float(torch.cuda.memory_reserved(i)))
            peak.add_metric([str(i)], float(torch.cuda.max_memory_allocated(i)))
        yield allocated
        yield reserved
        yield peak


class Metrics:
    """Every series of the server on one CollectorRegistry (`.registry`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("longscribe_jobs", "Jobs by state", ["state"], registry=r)
        self.queue_depth = Gauge(
            "longscribe_queue_depth", "Items waiting in a chunk queue", ["queue"], registry=r)
        self.queue_bytes = Gauge(
            "longscribe_queue_bytes", "Bytes waiting in a chunk queue", ["queue"], registry=r)
        self.chunk_wait = Histogram(
            "longscribe_chunk_wait_seconds", "Time a chunk waited in a queue", ["queue"],
            buckets=_WAIT_BUCKETS, registry=r)
        self.chunk_processing = Histogram(
            "longscribe_chunk_processing_seconds", "Time to transcribe one chunk or batch",
            buckets=_PROCESS_BUCKETS, registry=r)
        self.chunks_dropped = Counter(
            "longscribe_chunks_dropped", "Chunks dropped by a queue", ["queue", "reason"],
            registry=r)
        self.audio_bytes = Counter(
            "longscribe_audio_bytes_received", "Media bytes received (uploads, downloads)",
            ["source"], registry=r)
        self.windows_transcribed = Counter(
            "longscribe_windows_transcribed", "Audio windows decoded by the engine", registry=r)
        self.window_batch_size = Histogram(
            "longscribe_window_batch_size", "Windows per engine batch", buckets=_BATCH_BUCKETS,
            registry=r)
        self.audio_decoded = Counter(
            "longscribe_audio_decoded_seconds", "Audio seconds decoded from media by ffmpeg",
            registry=r)
        self.realtime_factor = Gauge(
            "longscribe_realtime_factor", "Audio seconds transcribed per wall second (latest)",
            registry=r)
        self.rss = Gauge(
            "longscribe_process_resident_memory_bytes", "Resident memory of the server process",
            registry=r)
        process = psutil.Process()
        self.rss.set_function(lambda: float(process.memory_info().rss))
        # jobs: labels are bounded sets (end state, gRPC code), never a job id
        self.jobs_finished = Counter(
            "longscribe_jobs_finished", "Jobs that ended, by end state", ["state"], registry=r)
        self.jobs_failed = Counter(
            "longscribe_jobs_failed", "Failed jobs by gRPC status code", ["code"], registry=r)
        self.job_duration = Histogram(
            "longscribe_job_duration_seconds", "From a job's start to its end (one run)",
            buckets=_JOB_BUCKETS, registry=r)
        self.job_queue_wait = Histogram(
            "longscribe_job_queue_wait_seconds", "From a job's submission to its start",
            buckets=_JOB_BUCKETS, registry=r)
        # the remote engine: one remote per server, so no label names it (and none a job)
        self.remote_requests = Counter(
            "longscribe_remote_requests", "Requests to the remote transcription API by outcome "
            "(ok, rate_limited, transient, rejected, cancelled)", ["outcome"], registry=r)
        self.remote_request_seconds = Histogram(
            "longscribe_remote_request_seconds", "Time of one request to the remote",
            buckets=_PROCESS_BUCKETS, registry=r)
        self.remote_failures = Counter(
            "longscribe_remote_failures", "Requests the circuit breaker counted as failures "
            "(5xx, timeouts, refused or broken connections)", registry=r)
        self.remote_consecutive_failures = Gauge(
            "longscribe_remote_consecutive_failures", "Failures in a row right now", registry=r)
        self.remote_circuit_state = Gauge(
            "longscribe_remote_circuit_state", "Circuit breaker of the remote: 1 for the state "
            "it is in (closed, open, half_open)", ["state"], registry=r)
        self.remote_circuit_opened = Counter(
            "longscribe_remote_circuit_opened", "Times the circuit breaker opened", registry=r)
        self.remote_in_flight = Gauge(
            "longscribe_remote_in_flight", "Requests to the remote in flight", registry=r)
        self.remote_queue_wait = Histogram(
            "longscribe_remote_queue_wait_seconds", "Time a window waited for a request slot",
            buckets=_WAIT_BUCKETS, registry=r)
        self.remote_rate_limited_seconds = Counter(
            "longscribe_remote_rate_limited_seconds", "Seconds requests waited for the token "
            "bucket or a Retry-After", registry=r)
        self.remote_degradation_level = Gauge(
            "longscribe_remote_degradation_level", "Remote engine degradation step (0: full)",
            registry=r)
        self.remote_degradation_steps = Counter(
            "longscribe_remote_degradation_steps", "Degradation steps taken, by direction",
            ["direction"], registry=r)
        # the local engine's graceful degradation (engine.DEGRADATION_STEPS)
        self.engine_degradation_level = Gauge(
            "longscribe_engine_degradation_level",
            "Local engine degradation step (0: full; 1: no temperature fallback; 2: smaller "
            "beam; 3: no word alignment)", registry=r)
        self.engine_degradation_steps = Counter(
            "longscribe_engine_degradation_steps", "Engine degradation steps taken, by direction",
            ["direction"], registry=r)
        # live audio: bounded labels only (a session id would leave series behind forever)
        self.live_sessions = Gauge(
            "longscribe_live_sessions", "Open TranscribeLive sessions", registry=r)
        self.live_frames_dropped = Counter(
            "longscribe_live_frames_dropped", "Live audio frames dropped, by reason", ["reason"],
            registry=r)
        self.live_final_latency = Histogram(
            "longscribe_live_final_latency_seconds",
            "From receiving an utterance's last speech to sending its final",
            buckets=_LATENCY_BUCKETS, registry=r)
        ProcessCollector(registry=r)  # the standard process_* series (CPU, memory, fds)
        r.register(_GpuCollector())

    def set_jobs_by_state(self, counts: Mapping[str, int]) -> None:
        for state, count in counts.items():
            self.jobs.labels(state=state).set(count)

    def add_audio_bytes(self, n: int, source: str = "upload") -> None:
        if n > 0:
            self.audio_bytes.labels(source=source).inc(n)

    def observe_chunk_processing(self, seconds: float) -> None:
        self.chunk_processing.observe(seconds)

    def observe_window_batch(self, seconds: float, windows: int) -> None:
        """One engine batch of `windows` windows took `seconds`."""
        self.chunk_processing.observe(seconds)
        if windows > 0:
            self.windows_transcribed.inc(windows)
            self.window_batch_size.observe(windows)

    def set_engine_degradation(self, level: int, direction: str) -> None:
        """The engine stepped `direction` ("down": less work per window, "up") to `level`."""
        self.engine_degradation_level.set(level)
        self.engine_degradation_steps.labels(direction=direction).inc()

    def add_decoded_audio(self, seconds: float) -> None:
        if seconds > 0:
            self.audio_decoded.inc(seconds)

    def set_realtime_factor(self, value: float) -> None:
        self.realtime_factor.set(value)


class QueueMetricsObserver:
    """`AudioChunkQueue` observer that publishes depth, bytes, waits and drops.

    `group`: the label for the wait histogram and the drop counter instead of the queue's name,
    for queues that live as long as one job (a histogram series per job would pile up forever).
    `forget(queue)` removes the queue's depth/bytes series and ignores its later hooks.
    """

    def __init__(self, metrics: Metrics | None = None, *, group: str | None = None) -> None:
        self.metrics = metrics or default()
        self.group = group
        self._lock = threading.Lock()  # a hook racing forget() must not bring a series back
        self._forgotten: set[str] = set()

    def on_put(self, queue: str, depth: int, nbytes: int) -> None:
        self._set(queue, depth, nbytes)

    def on_get(self, queue: str, depth: int, nbytes: int, wait_seconds: float) -> None:
        self._set(queue, depth, nbytes)
        self.metrics.chunk_wait.labels(queue=self.group or queue).observe(wait_seconds)

    def on_drop(self, queue: str, depth: int, nbytes: int, reason: str, count: int) -> None:
        self._set(queue, depth, nbytes)
        self.metrics.chunks_dropped.labels(queue=self.group or queue, reason=reason).inc(count)

    def forget(self, queue: str) -> None:
        """The queue is gone: drop its depth/bytes series (not set them to 0 forever)."""
        with self._lock:
            self._forgotten.add(queue)
            self.metrics.queue_depth.remove(queue)
            self.metrics.queue_bytes.remove(queue)

    def _set(self, queue: str, depth: int, nbytes: int) -> None:
        with self._lock:
            if queue in self._forgotten:
                return
            self.metrics.queue_depth.labels(queue=queue).set(depth)
            self.metrics.queue_bytes.labels(queue=queue).set(nbytes)


_default: Metrics | None = None
_default_lock = threading.Lock()


def default() -> Metrics:
    """The process-wide instance the module-level functions use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Metrics()
        return _default


def set_jobs_by_state(counts: Mapping[str, int]) -> None:
    default().set_jobs_by_state(counts)


def add_audio_bytes(n: int, source: str = "upload") -> None:
    default().add_audio_bytes(n, source)


def observe_chunk_processing(seconds: float) -> None:
    default().observe_chunk_processing(seconds)


def observe_window_batch(seconds: float, windows: int) -> None:
    default().observe_window_batch(seconds, windows)


def set_engine_degradation(level: int, direction: str) -> None:
    default().set_engine_degradation(level, direction)


def add_decoded_audio(seconds: float) -> None:
    default().add_decoded_audio(seconds)


def set_realtime_factor(value: float) -> None:
    default().set_realtime_factor(value)


def observe_job_started(queue_wait_seconds: float) -> None:
    default().job_queue_wait.observe(max(0.0, queue_wait_seconds))


def observe_job_finished(state: str, run_seconds: float, code: str = "") -> None:
    """`state`: succeeded, failed or cancelled; `code`: the gRPC code name of a failure."""
    m = default()
    m.jobs_finished.labels(state=state).inc()
    m.job_duration.observe(max(0.0, run_seconds))
    if code:
        m.jobs_failed.labels(code=code).inc()


def live_session_opened() -> None:
    default().live_sessions.inc()


def live_session_closed() -> None:
    default().live_sessions.dec()


def add_live_dropped(frames: int, reason: str) -> None:
    """`reason`: overflow, rejected, stale or source_dropped."""
    if frames > 0:
        default().live_frames_dropped.labels(reason=reason).inc(frames)


def observe_live_final_latency(seconds: float) -> None:
    default().live_final_latency.observe(max(0.0, seconds))


def start_metrics_server(
    port: int, addr: str = "127.0.0.1", metrics: Metrics | None = None
) -> tuple[WSGIServer, int]:
    """Serve `metrics` (default: the process-wide one) at http://addr:port/metrics."""
    registry = (metrics or default()).registry
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, int(server.server_port)


def stop_metrics_server(server: WSGIServer) -> None:
    server.shutdown()
    server.server_close()

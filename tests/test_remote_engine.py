"""The remote engine through real servers of ours and a real peer: faster-whisper-server (an
OpenAI-compatible server) on 127.0.0.1 serving the offline tiny.en, killed and restarted for
outages, with our fault-injecting proxy (tests/remote_proxy.py) in front of it for 401, 429,
500 and slow answers. Unit tests of the token bucket, the circuit breaker and the degradation
steps run on a fake clock."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (
    JFK,
    LJ,
    ServerProcess,
    free_port,
    jfk_text,
    lj_text,
    require_testdata,
    wer,
)
from tests.remote_proxy import FaultProxy

MODEL = "tiny.en"  # the peer's name for the offline model (its config file maps it)
KEY = "sk-longscribe-test"


# --- the peer --------------------------------------------------------------------------------

class Peer:
    """faster-whisper-server as a child process (its own process group, so a kill is total)."""

    def __init__(self, workdir: Path) -> None:
        from longscribe.service.models import default_model_dir

        self.port = free_port()
        self.config = workdir / "peer.yaml"
        # greedy int8 on 2 threads: the peer's own choice, fast enough for tests on 2 cores
        self.config.write_text(
            f"models:\n  - name: {MODEL}\n    path: {default_model_dir()}\n"
            "    model_options: {device: cpu, compute_type: int8, cpu_threads: 2}\n"
            "    transcribe_options: {beam_size: 1}\n")
        self.log_path = workdir / "peer.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Peer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "faster_whisper_server", "--config", str(self.config),
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"peer not up:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    require_testdata()
    p = Peer(tmp_path_factory.mktemp("peer")).start()
    _post_direct(p.port, JFK)  # the peer loads its model on the first request
    yield p
    p.kill()


def _post_direct(port: int, path: Path) -> None:
    import requests

    with path.open("rb") as f:
        r = requests.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions",
                          data={"model_name": MODEL}, files={"file": f}, timeout=120)
    r.raise_for_status()


# --- media and our servers -------------------------------------------------------------------

def _pcm(path: Path) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-f",
                          "s16le", "-ac", "1", "-ar", "16000", "-"], capture_output=True,
                         check=True).stdout
    return np.frombuffer(raw, dtype="<i2")


@pytest.fixture(scope="module")
def jfk_many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JFK twelve times with 4 s of silence between: twelve short windows (gaps over the
    segmenter's 3 s never share a window), each quick for the peer."""
    clip = _pcm(JFK)
    gap = np.zeros(4 * 16000, dtype="<i2")
    audio = np.concatenate([part for _ in range(12) for part in (clip, gap)])
    path = tmp_path_factory.mktemp("media") / "jfk12.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(audio.tobytes())
    return path


class Remote:
    """One longscribe server on the remote engine, with its metrics port."""

    def __init__(self, tmp: Path, name: str, url: str, *flags: str) -> None:
        self.metrics_port = free_port()
        key_file = tmp / f"{name}.key"
        key_file.write_text(KEY + "\n")
        self.server = ServerProcess(
            tmp / name, "--engine", "remote", "--remote-url", url, "--remote-model", MODEL,
            "--remote-model-field", "model_name", "--remote-api-key-file", str(key_file),
            "--metrics-port", str(self.metrics_port), "--workers", "2", *flags)

    def start(self) -> Remote:
        self.server.start(timeout=120)
        return self

    def client(self) -> object:
        from longscribe.client.client import LongscribeClient

        return LongscribeClient(self.server.target, timeout=60)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)"
        match = re.search(r"^" + pattern + "$", self.metrics(), re.M)
        return float(match.group(1)) if match else 0.0


def _run(remote: Remote, media: Path, events: list[object] | None = None,
         on_job: Callable[[str], None] | None = None) -> tuple[object | None, object | None]:
    """(result, None) or (None, LongscribeError) of one job, every event into `events`."""
    from longscribe.client.client import LongscribeError

    with remote.client() as client:
        job = client.upload(media)
        if on_job is not None:
            on_job(job.job_id)
        try:
            return client.wait(job.job_id, on_event=(events.append if events is not None
                                                      else None)), None
        except LongscribeError as exc:
            return None, exc


def _messages(events: list[object]) -> list[str]:
    return [e.progress.message for e in events
            if e.WhichOneof("event") == "progress" and e.progress.message]


# --- through the peer, no proxy: accuracy, outages, restarts ---------------------------------

@pytest.fixture(scope="module")
def direct(peer: Peer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    remote = Remote(tmp_path_factory.mktemp("direct"), "direct", peer.url,
                    "--remote-concurrency", "3", "--remote-down-timeout", "60").start()
    yield remote
    remote.server.stop()


def test_jfk_through_the_peer(direct: Remote) -> None:
    result, error = _run(direct, JFK)
    assert error is None, error
    assert wer(jfk_text(), result.text) <= 0.05, result.text
    assert result.language == "en"
    assert result.segments and all(0 <= s.start < s.end <= 11.1 for s in result.segments)
    assert "remote engine, http://127.0.0.1:" in direct.server.log()


def test_peer_killed_mid_job_and_restarted(direct: Remote, peer: Peer) -> None:
    """LJSpeech (234 s): the peer dies 5 s in and is back 10 s later on the same port; the job
    waits with the circuit open and then finishes with the whole transcript."""
    events: list[object] = []
    outcome: list[tuple[object | None, object | None]] = []
    opened_before = direct.metric("longscribe_remote_circuit_opened_total")
    runner = threading.Thread(target=lambda: outcome.append(_run(direct, LJ, events)))
    runner.start()
    time.sleep(5)
    peer.kill()
    killed = time.monotonic()
    time.sleep(10)
    state_while_down = direct.metric("longscribe_remote_circuit_state", 'state="open"') + \
        direct.metric("longscribe_remote_circuit_state", 'state="half_open"')
    peer.start()
    runner.join(180)
    assert outcome, "the job did not end"
    result, error = outcome[0]
    assert error is None, f"{error}\n{direct.server.log()[-3000:]}"
    assert wer(lj_text(), result.text) <= 0.08, result.text
    assert result.duration_seconds > 230
    waits = [m for m in _messages(events) if "circuit open" in m]
    assert waits and f"remote {peer.url} unavailable for" in waits[-1], _messages(events)
    assert state_while_down == 1.0
    assert direct.metric("longscribe_remote_circuit_opened_total") > opened_before
    assert direct.metric("longscribe_remote_circuit_state", 'state="closed"') == 1.0
    print(f"LJ WER through the peer with a 10 s outage: {wer(lj_text(), result.text):.4f}, "
          f"job ended {time.monotonic() - killed:.1f} s after the kill")


def test_server_restart_sends_no_stored_window_again(direct: Remote) -> None:
    from longscribe.client.client import LongscribeClient

    with direct.client() as client:
        job_id = client.upload(LJ).job_id
        deadline = time.monotonic() + 120
        while client.get(job_id).chunks_done < 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert direct.server.stop() == 0  # SIGTERM: the job stops and resumes on restart
    direct.server.start(timeout=120)
    with LongscribeClient(direct.server.target, timeout=60) as client:
        result = client.wait(job_id)
        job = client.get(job_id)
    assert wer(lj_text(), result.text) <= 0.08
    assert job.chunks_reused >= 3
    sent = direct.metric("longscribe_remote_requests_total", 'outcome="ok"')
    assert sent == job.chunks_total - job.chunks_reused, (sent, job)
    print(f"restart: {job.chunks_reused} of {job.chunks_total} windows reused, {sent:.0f} sent "
          "after the restart")


# --- through the proxy: key, limits, retries, slowness, cancel, a remote gone ------------------

@pytest.fixture(scope="module")
def proxy(peer: Peer) -> Iterator[FaultProxy]:
    p = FaultProxy(peer.port, api_key=KEY).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def proxied(proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    remote = Remote(tmp_path_factory.mktemp("proxied"), "proxied", proxy.url,
                    "--remote-concurrency", "2", "--remote-down-timeout", "5",
                    "--remote-failure-threshold", "3", "--remote-degrade-after", "3").start()
    yield remote
    remote.server.stop()


def test_rate_limit_rpm(proxy: FaultProxy, jfk_many: Path, tmp_path: Path) -> None:
    """--remote-rpm 30: no 60 s window sees more than 30 requests, because the bucket (burst 2,
    refill 28/min) bounds every stretch of t seconds to 2 + 28 t / 60; checked on the proxy's
    log over twelve requests (the 60 s property itself on a fake clock below)."""
    remote = Remote(tmp_path, "rpm", proxy.url, "--remote-rpm", "30",
                    "--remote-concurrency", "2", "--remote-degrade-after", "0").start()
    try:
        first = len(proxy.requests())
        result, error = _run(remote, jfk_many)
        assert error is None, error
        times = [r.arrived for r in proxy.requests()[first:]]
    finally:
        remote.server.stop()
    assert len(times) == 12
    assert wer(" ".join([jfk_text()] * 12), result.text) <= 0.05
    for i in range(len(times)):
        in_minute = sum(1 for t in times[i:] if t - times[i] < 60)
        assert in_minute <= 30
        for j in range(i, len(times)):
            assert j - i + 1 <= 2 + 28 * (times[j] - times[i]) / 60 + 1e-6 + 0.05, (i, j, times)
    span = times[-1] - times[0]
    assert span >= 10 * 60 / 28 - 0.5, span  # the limit held the requests back
    print(f"rpm 30: 12 requests over {span:.1f} s")


def test_429_retry_after_and_500_are_retried(proxy: FaultProxy, proxied: Remote) -> None:
    first = len(proxy.requests())
    proxy.faults.extend([(429, 2.0), (500, 0.0)])
    result, error = _run(proxied, JFK)
    assert error is None, error
    assert wer(jfk_text(), result.text) <= 0.05
    log = proxy.requests()[first:]
    assert [r.status for r in log] == [429, 500, 200], log
    delay = log[1].arrived - log[0].ended
    assert 2.0 <= delay < 5.0, delay  # Retry-After honoured, and not much more
    assert proxied.metric("longscribe_remote_requests_total", 'outcome="rate_limited"') >= 1
    assert proxied.metric("longscribe_remote_requests_total", 'outcome="transient"') >= 1
    print(f"429 Retry-After 2: next request {delay:.2f} s later")


def test_bad_key_fails_the_job_naming_the_remote(proxy: FaultProxy, proxied: Remote) -> None:
    import grpc

    proxy.api_key = "sk-another-key"  # our server's key is now the wrong one
    try:
        result, error = _run(proxied, JFK)
    finally:
        proxy.api_key = KEY
    assert result is None and error is not None
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert f"remote {proxy.url}" in error.message and "API key rejected" in error.message
    assert "Incorrect API key provided" in error.message


def test_bad_model_is_invalid_argument(proxy: FaultProxy, tmp_path: Path) -> None:
    import grpc

    remote = Remote(tmp_path, "badmodel", proxy.url, "--remote-model", "no-such-model").start()
    try:
        result, error = _run(remote, JFK)
    finally:
        remote.server.stop()
    assert result is None and error is not None
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-model" in error.message and "unknown model" in error.message, error.message


def test_degrades_under_a_slow_peer_and_recovers(proxy: FaultProxy, proxied: Remote,
                                                 jfk_many: Path) -> None:
    """Answers 6 s late for the first four requests: windows wait over 3 s for a slot, so the
    engine steps down (temperature 0, then no word timestamps); once the peer is quick again
    it steps back up."""
    deadline = time.monotonic() + 20
    while proxied.metric("longscribe_remote_degradation_level") > 0:  # earlier tests' steps
        assert time.monotonic() < deadline
        time.sleep(0.5)
    downs = proxied.metric("longscribe_remote_degradation_steps_total", 'direction="down"')
    ups = proxied.metric("longscribe_remote_degradation_steps_total", 'direction="up"')
    first = len(proxy.requests())
    with proxy.lock:
        proxy.delay, proxy.delay_count = 6.0, 4
    events: list[object] = []
    result, error = _run(proxied, jfk_many, events)
    assert error is None, error
    assert wer(" ".join([jfk_text()] * 12), result.text) <= 0.05  # no audio dropped
    messages = _messages(events)
    assert any("stepped down to level 1 (no temperature fallback)" in m for m in messages), \
        messages
    log = proxy.requests()[first:]
    assert log[0].words and log[0].temperature is None  # full service at first
    assert any(r.temperature == "0.0" for r in log)  # step 1 reached the peer
    assert any(not r.words for r in log)  # and step 2
    deadline = time.monotonic() + 20
    while proxied.metric("longscribe_remote_degradation_level") > 0:
        assert time.monotonic() < deadline, "never stepped back up"
        time.sleep(0.5)
    new_downs = proxied.metric("longscribe_remote_degradation_steps_total",
                               'direction="down"') - downs
    new_ups = proxied.metric("longscribe_remote_degradation_steps_total", 'direction="up"') - ups
    assert new_downs >= 1 and new_ups == new_downs, (new_downs, new_ups)
    print(f"degradation: {new_downs:.0f} steps down, {new_ups:.0f} up; messages: "
          f"{[m for m in messages if 'stepped' in m]}")


def test_cancel_cuts_in_flight_requests(proxy: FaultProxy, proxied: Remote) -> None:
    import grpc

    first = len(proxy.requests())
    with proxy.lock:
        proxy.delay, proxy.delay_count = 60.0, 0
    cancelled_at: list[float] = []

    def cancel_when_sent(job_id: str) -> None:
        def run() -> None:
            deadline = time.monotonic() + 60
            while len(proxy.requests()) == first:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)
            with proxied.client() as client:
                cancelled_at.append(time.monotonic())
                client.cancel(job_id)
        threading.Thread(target=run, daemon=True).start()

    try:
        result, error = _run(proxied, JFK, on_job=cancel_when_sent)
    finally:
        with proxy.lock:
            proxy.delay = 0.0
    assert error is not None and error.code == grpc.StatusCode.CANCELLED
    in_flight = proxy.requests()[first:]
    assert in_flight and all(r.client_gone_at is not None for r in in_flight), in_flight
    cut = max(r.client_gone_at for r in in_flight) - cancelled_at[0]
    assert cut < 2.0, cut
    print(f"cancel: in-flight request cut {cut:.2f} s after CancelJob")


def test_remote_gone_past_the_bound(proxy: FaultProxy, proxied: Remote) -> None:
    """The remote's port closes: refused connections open the circuit, the job waits 5 s
    (--remote-down-timeout) and fails UNAVAILABLE; the server keeps serving, and a job after
    the remote is back succeeds."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proxy.stop()
    events: list[object] = []
    try:
        started = time.monotonic()
        result, error = _run(proxied, JFK, events)
        took = time.monotonic() - started
        metrics_down = proxied.metrics()
    finally:
        proxy.start()
    assert result is None and error is not None
    assert error.code == grpc.StatusCode.UNAVAILABLE, error
    down = re.search(rf"remote {re.escape(proxy.url)} unavailable for (\d+) s", error.message)
    assert down and int(down.group(1)) >= 5, error.message
    assert "connection refused" in error.message and "--remote-down-timeout 5 s" in error.message
    assert 5 <= took < 30, took
    assert any("circuit open" in m for m in _messages(events)), _messages(events)
    assert re.search(r'^longscribe_remote_circuit_state\{state="closed"\} 0\.0$', metrics_down,
                     re.M), metrics_down
    assert re.search(r"^longscribe_remote_circuit_opened_total [1-9]", metrics_down, re.M)
    channel = grpc.insecure_channel(proxied.server.target)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
    finally:
        channel.close()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    result, error = _run(proxied, JFK)  # the circuit half-opens, the probe works, it closes
    assert error is None, error
    assert proxied.metric("longscribe_remote_circuit_state", 'state="closed"') == 1.0


@pytest.mark.parametrize(("flags", "message"), [
    ([], "--engine remote needs --remote-url"),
    (["--remote-url", "http://127.0.0.1:9/v1"], "--engine remote needs --remote-model"),
    (["--remote-url", "http://127.0.0.1:9/v1", "--remote-model", "m", "--remote-api-key-file",
      "/nonexistent/key"], "--remote-api-key-file: cannot read it"),
])
def test_engine_refuses_missing_settings(flags: list[str], message: str) -> None:
    """What `longscribe serve` would build from these flags: a clear refusal, no server."""
    import argparse

    from longscribe.service import config as config_module
    from longscribe.service.engines import create_engine
    from longscribe.service.models import ModelLoadError

    parser = argparse.ArgumentParser()
    config_module.add_arguments(parser)
    config = config_module.from_namespace(parser.parse_args(["--engine", "remote", *flags]))
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        create_engine(config)


# --- units on a fake clock -------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("rpm", "burst"), [(30, 3), (30, 1), (60, 4), (5, 1), (1, 1)])
def test_token_bucket_never_lets_more_than_rpm_into_any_minute(rpm: int, burst: int) -> None:
    from longscribe.service.ratelimit import TokenBucket

    clock = FakeClock()
    bucket = TokenBucket(rpm, burst=burst, clock=clock)
    sent: list[float] = []
    end = clock.now + 600
    while clock.now < end:  # a greedy sender: takes every token the moment it exists
        wait = bucket.try_take()
        if wait == 0:
            sent.append(clock.now)
        else:
            clock.now += wait
    busiest = max(sum(1 for t in sent[i:] if t - sent[i] < 60) for i in range(len(sent)))
    assert busiest <= rpm
    # and it is a limit, not a stop: the refill runs at rpm less the burst (one token of margin
    # for the remote's clock, which sees our requests with network jitter)
    sustained = rpm - bucket.capacity if rpm >= 2 else rpm
    assert len(sent) >= sustained * 10


def test_token_bucket_pauses_for_retry_after() -> None:
    from longscribe.service.ratelimit import TokenBucket

    clock = FakeClock()
    bucket = TokenBucket(0, clock=clock)  # no rpm limit, but a 429 still pauses everyone
    assert bucket.try_take() == 0
    bucket.pause_for(2.5)
    assert bucket.try_take() == pytest.approx(2.5)
    clock.now += 2.5
    assert bucket.try_take() == 0


def test_circuit_opens_probes_and_closes() -> None:
    from longscribe.service.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker

    clock = FakeClock()
    changes: list[str] = []
    circuit = CircuitBreaker(3, open_seconds=1.0, max_open_seconds=4.0, clock=clock,
                             on_change=changes.append)
    for _ in range(2):
        circuit.failure("connection refused")
    assert circuit.state == CLOSED and circuit.allow() == (0.0, False)
    circuit.failure("connection refused")
    assert circuit.state == OPEN
    assert circuit.allow() == (1.0, False)
    clock.now += 1.0
    assert circuit.allow() == (0.0, True)  # the probe
    assert circuit.state == HALF_OPEN and circuit.allow()[0] > 0  # one probe at a time
    circuit.failure("connection refused", probe=True)
    assert circuit.state == OPEN and circuit.allow() == (2.0, False)  # backs off
    clock.now += 2.0
    assert circuit.down_for() == 3.0
    wait, probe = circuit.allow()
    assert probe
    circuit.release(probe)  # its job was cancelled: another may probe
    wait, probe = circuit.allow()
    assert probe
    circuit.success(probe)
    assert circuit.state == CLOSED and circuit.down_for() == 0.0
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_degradation_steps_down_and_back_up() -> None:
    from longscribe.service.remote_engine import Degradation

    clock = FakeClock()
    d = Degradation(3.0, clock=clock)
    assert d.observe(1.0) == 0 and d.level == 0
    assert d.observe(4.0) == 1 and d.level == 1
    clock.now += 1
    assert d.observe(9.0) == 0  # at most one step per 3 s
    clock.now += 2
    assert d.observe(2.0) == 1 and d.level == 2  # the 9 s wait counts
    clock.now += 3
    assert d.observe(4.0) == 0 and d.level == 2  # the lowest step
    clock.now += 3
    assert d.observe(1.0) == -1 and d.level == 1
    clock.now += 3
    assert d.observe(0.0, idle=True) == -1 and d.level == 0


def test_window_result_from_openai_verbose_json() -> None:
    from longscribe.service.remote_engine import window_result
    from longscribe.service.segment import Window
    from longscribe.service.transcriber import DecodeOptions

    window = Window(index=4, start_sample=16000 * 100, samples=np.zeros(16000 * 10, np.float32))
    answer = {
        "language": "english", "text": "Hello there. Silence",
        "segments": [
            {"start": 0.5, "end": 2.0, "text": " Hello there.", "avg_logprob": -0.2,
             "no_speech_prob": 0.01, "compression_ratio": 1.1, "temperature": 0.0},
            {"start": 3.0, "end": 12.0, "text": " Silence", "avg_logprob": -1.5,
             "no_speech_prob": 0.9},
        ],
        "words": [{"word": "Hello", "start": 0.5, "end": 1.0},
                  {"word": "there", "start": 1.1, "end": 1.9}],
    }
    result = window_result(window, answer, DecodeOptions())
    assert (result.index, result.start, result.end, result.language) == (4, 100.0, 110.0, "en")
    [segment] = result.segments  # the second is whisper's no-speech case
    assert (segment.start, segment.end, segment.text) == (100.5, 102.0, " Hello there.")
    assert [(w.word, w.start, w.end) for w in segment.words] == [
        (" Hello", 100.5, 101.0), (" there", 101.1, 101.9)]


def test_retry_after_forms() -> None:
    from email.utils import formatdate

    from longscribe.service.remote_http import retry_after_seconds

    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = time.time()
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(
        30, abs=1)

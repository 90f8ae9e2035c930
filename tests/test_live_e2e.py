"""TranscribeLive end to end: a real server process (offline tiny.en), real speech, the real
CLI and grpcurl. Finals and the session's job, two sources, every bad input, a client that
vanishes (its session finalised, nothing leaked) and one that comes back (resume)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from longscribe.client.client import LongscribeClient
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc

from tests.conftest import JFK, TESTDATA, ServerProcess, free_port, jfk_text, wer
from tests.grpcurl import grpcurl_path

SR = 16000
SERVICE = "longscribe.v1.TranscriptionService"
LIBRI = TESTDATA / "1221-135766-0002.wav"
RESUME_SECONDS = 8.0


def pcm(path: Path) -> bytes:
    return subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac",
                           "1", "-ar", str(SR), "-f", "s16le", "-"], capture_output=True,
                          check=True).stdout


def libri_text() -> str:
    refs = dict(line.split("\t", 1) for line in (TESTDATA / "refs.tsv").read_text().splitlines())
    return refs[LIBRI.name]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("live") / "data",
                         "--metrics-port", str(free_port()),
                         "--live-resume-seconds", str(RESUME_SECONDS))
    proc.metrics_port = int(proc.args[proc.args.index("--metrics-port") + 1])  # type: ignore
    proc.start()
    yield proc
    code = proc.stop()
    assert code == 0, f"server did not stop cleanly ({code}):\n{proc.log()[-3000:]}"


def metric(server: ServerProcess, name: str) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"  # type: ignore[attr-defined]
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            if head == name or head.startswith(name + "{"):
                total += float(value)
    return total


def frames(audio: bytes, seconds: float = 0.1) -> Iterator[bytes]:
    step = int(seconds * SR) * 2
    for i in range(0, len(audio), step):
        yield audio[i:i + step]


def config(sources: list[str], **kw: object) -> pb.LiveRequest:
    fields: dict[str, object] = {"sample_rate": SR, "encoding": "pcm_s16le", **kw}
    return pb.LiveRequest(config=pb.LiveConfig(sources=sources, **fields))


def audio(source: str, data: bytes) -> pb.LiveRequest:
    return pb.LiveRequest(audio=pb.LiveAudio(source=source, data=data))


def paced(requests: list[pb.LiveRequest], pace: float) -> Iterator[pb.LiveRequest]:
    start = time.monotonic()
    sent = 0.0
    for r in requests:
        yield r
        if r.HasField("audio"):
            sent += len(r.audio.data) / 2 / SR
            delay = start + sent / pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def held_open(requests: Iterator[pb.LiveRequest], until: threading.Event
              ) -> Iterator[pb.LiveRequest]:
    """`requests`, then the stream stays open (no half-close) until `until` is set: a client
    that vanishes, rather than one that ends its stream."""
    yield from requests
    until.wait(60)


def call(server: ServerProcess, requests: Iterator[pb.LiveRequest], timeout: float = 120
         ) -> list[pb.LiveEvent]:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TranscriptionServiceStub(channel)
        return list(stub.TranscribeLive(requests, timeout=timeout))


def refused(server: ServerProcess, requests: list[pb.LiveRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(server, iter(requests), timeout=60)
    return err.value


def logged_events(server: ServerProcess, job_id: str) -> list[pb.JobEvent]:
    """A running job's event log so far (WatchJob until a short deadline)."""
    events: list[pb.JobEvent] = []
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TranscriptionServiceStub(channel)
        try:
            for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=3):
                events.append(event)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
    return events


def wait_for(check, timeout: float = 30.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_cli_streams_two_sources_and_the_session_is_a_job(live_server: ServerProcess) -> None:
    env = {**os.environ, "LONGSCRIBE_SERVER": live_server.target}
    proc = subprocess.run(
        [sys.executable, "-m", "longscribe.client", "live", str(JFK), str(LIBRI), "--name",
         "mic", "--name", "system", "--pace", "3", "--overflow", "block", "--json"],
        capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "started" and kinds[-1] == "end" and "final" in kinds
    # "block": a server slower than 3x real time slows the client down, nothing is dropped
    assert not [e for e in events if "status" in e and e["status"]["state"] not in
                ("LIVE_SOURCE_OK", "LIVE_SOURCE_BACKPRESSURE")]
    finals = [e["final"] for e in events if "final" in e]
    mic = " ".join(f.get("text", "") for f in finals if f["source"] == "mic")
    system = " ".join(f.get("text", "") for f in finals if f["source"] == "system")
    assert wer(jfk_text(), mic) <= 0.1, mic
    assert wer(libri_text(), system) <= 0.15, system
    session_id = events[0]["started"]["sessionId"]
    with LongscribeClient(live_server.target, timeout=30) as client:
        job = client.get(session_id, include_result=True)
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.source == "live:mic,system"
        # the job's segments are both sources' in time order, each saying whose it is
        by_source = {name: " ".join(s.text for s in job.result.segments if s.source == name)
                     for name in ("mic", "system")}
        assert wer(jfk_text(), by_source["mic"]) <= 0.1
        assert wer(libri_text(), by_source["system"]) <= 0.15
        starts = [s.start for s in job.result.segments]
        assert starts == sorted(starts)
        assert "-->" in job.result.formats.srt
        segments = [e.segment for e in client.watch(session_id) if e.HasField("segment")]
        assert len(segments) == len(job.result.segments)
        assert all(s.words for s in segments)


def test_bad_input_gets_a_clear_status_and_frees_everything(live_server: ServerProcess) -> None:
    one_second = pcm(JFK)[:SR * 2]
    cases = [
        ([audio("mic", one_second)], "first LiveRequest must carry config"),
        ([config(["mic"]), audio("speaker", one_second)], "unknown source 'speaker'"),
        ([config(["mic"]), audio("mic", one_second[:301])], "whole number"),
        ([pb.LiveRequest(config=pb.LiveConfig(sources=["mic"], sample_rate=44100))], "16000"),
        ([config(["mic"]), audio("mic", b"\x00" * (SR * 2 * 3))], "limit of 2.00 s"),
        ([config(["mic"]), audio("mic", one_second), config(["mic"])], "only be sent once"),
        ([config(["mic"], encoding="opus")], "encoding"),
    ]
    for requests, words in cases:
        err = refused(live_server, requests)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (words, err.details())
        assert words in err.details(), err.details()
    # the sessions that got that far are FAILED jobs with the same reason, and nothing is open
    wait_for(lambda: metric(live_server, "longscribe_live_sessions") == 0, what="sessions")
    with LongscribeClient(live_server.target, timeout=30) as client:
        failed = client.list(states=[pb.JOB_STATE_FAILED])
        assert any("unknown source" in j.error.message for j in failed)
        assert not [j for j in client.list(states=[pb.JOB_STATE_TRANSCRIBING])
                    if j.source.startswith("live:")]


def test_vanished_client_is_finalised_and_a_returning_one_resumes(
        live_server: ServerProcess) -> None:
    jfk = pcm(JFK)
    half = len(jfk) // 2 // 3200 * 3200  # ~5.5 s, on a frame boundary

    # first stream: half of JFK, then the client vanishes (the call is cancelled)
    with grpc.insecure_channel(live_server.target) as channel:
        stub = pb_grpc.TranscriptionServiceStub(channel)
        requests = [config(["mic"])] + [audio("mic", f) for f in frames(jfk[:half])]
        gone = threading.Event()
        stream = stub.TranscribeLive(held_open(paced(requests, 4.0), gone))
        started = next(stream).started
        session_id = started.session_id
        time.sleep(half / 2 / SR / 4.0 + 0.5)  # everything sent
        stream.cancel()
        gone.set()
    with LongscribeClient(live_server.target, timeout=30) as client:
        # what it sent is transcribed and stored, and the session is freed (detached)
        wait_for(lambda: metric(live_server, "longscribe_live_sessions") == 0, what="detach")
        assert client.get(session_id).state == pb.JOB_STATE_TRANSCRIBING  # resumable
        first = [e.segment for e in logged_events(live_server, session_id)
                 if e.HasField("segment")]
        assert first and wer(jfk_text(), " ".join(s.text for s in first)) > 0.3  # half of it
        assert "ask not" in " ".join(s.text for s in first).lower()

        # the client comes back with the session id: the timeline goes on from where it stopped
        requests = [config(["mic"], session_id=session_id)] + \
            [audio("mic", f) for f in frames(jfk[half:])]
        events = call(live_server, paced(requests, 4.0))
        assert events[0].started.resumed and events[0].started.session_id == session_id
        assert abs(events[0].started.source_seconds["mic"] - half / 2 / SR) < 0.01
        finals = [e.final for e in events if e.HasField("final")]
        assert finals and min(f.start for f in finals) >= half / 2 / SR - 0.5
        assert events[-1].HasField("end")
        job = client.get(session_id, include_result=True)
        assert job.state == pb.JOB_STATE_SUCCEEDED
        assert wer(jfk_text(), job.result.text) <= 0.2, job.result.text

        # a finished session cannot be resumed
        err = refused(live_server, [config(["mic"], session_id=session_id)])
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

        # a session nobody comes back for is finalised after --live-resume-seconds
        requests = [config(["mic"])] + [audio("mic", f) for f in frames(jfk[:half])]
        with grpc.insecure_channel(live_server.target) as channel:
            stream = pb_grpc.TranscriptionServiceStub(channel).TranscribeLive(
                paced(requests, 4.0))
            lost = next(stream).started.session_id
            time.sleep(1.0)
            stream.cancel()
        wait_for(lambda: client.get(lost).state == pb.JOB_STATE_SUCCEEDED,
                 timeout=RESUME_SECONDS + 30, what="the abandoned session's job")
    wait_for(lambda: metric(live_server, "longscribe_live_sessions") == 0, what="sessions")

    # nothing leaked: more vanishing clients leave no thread, session or memory behind
    def vanish() -> None:
        requests = [config(["mic"])] + [audio("mic", f) for f in frames(jfk[:SR * 2])]
        with grpc.insecure_channel(live_server.target) as channel:
            stream = pb_grpc.TranscriptionServiceStub(channel).TranscribeLive(
                paced(requests, 2.0))
            next(stream)
            time.sleep(0.5)
            stream.cancel()
        wait_for(lambda: metric(live_server, "longscribe_live_sessions") == 0, what="detach")

    server = psutil.Process(live_server.pid)
    vanish()  # the shared pools have their threads now
    threads, rss = server.num_threads(), server.memory_info().rss
    for _ in range(4):
        vanish()
    assert server.num_threads() <= threads + 2
    assert server.memory_info().rss < rss + 50 * 2**20
    assert metric(live_server, "longscribe_audio_bytes_received_total") > len(jfk)
    assert metric(live_server, "longscribe_live_final_latency_seconds_count") >= 2


def test_grpcurl_drives_a_session_with_base64_frames(live_server: ServerProcess) -> None:
    data = pcm(JFK)
    # grpcurl sends everything at once: "block" has the server read it as fast as it
    # transcribes instead of dropping the oldest audio
    lines = [json.dumps({"config": {"sources": ["mic"], "sampleRate": SR,
                                    "encoding": "pcm_s16le", "overflow": "block"}})]
    lines += [json.dumps({"audio": {"source": "mic", "data": base64.b64encode(f).decode()}})
              for f in frames(data, 1.0)]
    # "-d @": the messages come on stdin (11 s of audio is over an argument's size limit)
    done = subprocess.run([grpcurl_path(), "-plaintext", "-d", "@", live_server.target,
                           f"{SERVICE}/TranscribeLive"], input="\n".join(lines),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    decoder = json.JSONDecoder()
    events, text = [], done.stdout.strip()
    while text:
        event, end = decoder.raw_decode(text)
        events.append(event)
        text = text[end:].strip()
    finals = [e["final"] for e in events if "final" in e]
    assert wer(jfk_text(), " ".join(f.get("text", "") for f in finals)) <= 0.1
    assert "end" in events[-1]


def test_cli_stdin_eof_and_ctrl_c_exit_cleanly(live_server: ServerProcess) -> None:
    env = {**os.environ, "LONGSCRIBE_SERVER": live_server.target}
    data = pcm(JFK)
    # stdin all at once, faster than real time: "block" keeps every frame
    done = subprocess.run([sys.executable, "-m", "longscribe.client", "live", "-",
                           "--overflow", "block"],
                          input=data, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines and all(line.startswith("[00:") for line in lines)  # one line per final
    assert wer(jfk_text(), " ".join(line.split("] ", 1)[1] for line in lines)) <= 0.15
    assert b"ended" in done.stderr
    # Ctrl-C while a file streams at real time: the finals so far, then a clean exit
    proc = subprocess.Popen([sys.executable, "-m", "longscribe.client", "live", str(JFK)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    time.sleep(5.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"ended" in err and b"Traceback" not in err
    assert out.strip(), err


def test_a_session_open_when_the_server_dies_ends_with_its_stored_finals(
        live_server: ServerProcess) -> None:
    """Last in this module: it kills the module's server and starts it again."""
    jfk = pcm(JFK)
    requests = [config(["mic"])] + [audio("mic", f) for f in frames(jfk)]
    with grpc.insecure_channel(live_server.target) as channel:
        stream = pb_grpc.TranscriptionServiceStub(channel).TranscribeLive(
            paced(requests + [audio("mic", b"\x00\x00" * SR)] * 60, 2.0))
        session_id = next(stream).started.session_id
        for event in stream:  # the first final is stored before it is sent
            if event.HasField("final") and event.final.text:
                break
        live_server.kill()  # mid-stream, the session open
    live_server.start()  # the same data dir: the open live job is ended, not re-run
    with LongscribeClient(live_server.target, timeout=30) as client:
        wait_for(lambda: client.get(session_id).state == pb.JOB_STATE_SUCCEEDED,
                 what="the live job's end after the restart")
        result = client.get(session_id, include_result=True).result
        assert result.segments and all(s.source == "mic" for s in result.segments)
        assert "fellow americans" in result.text.lower()

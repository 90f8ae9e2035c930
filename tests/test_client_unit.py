"""Client library and CLI, against an in-test gRPC peer that serves canned protobuf events.

The peer is a real grpc server on 127.0.0.1 implementing the generated servicer base class, so
the client's channel, metadata, streaming and status handling all run for real; only the job
behind it is scripted. End-to-end runs against the real longscribe server live elsewhere."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from longscribe.client import cli
from longscribe.client.client import LongscribeClient, make_options, state_value
from longscribe.client.errors import LongscribeError, status_code
from longscribe.client.output import transcript_text, write_transcript
from longscribe.client.progress import BarProgress, LogProgress, ProgressView, make_progress
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc

JOB = "job-1"
MiB = 1 << 20


# -- canned events ---------------------------------------------------------------------------


def _progress(i: int, phase: int, **fields: object) -> pb.JobEvent:
    return pb.JobEvent(
        index=i, job_id=JOB, state=phase, progress=pb.Progress(phase=phase, **fields)
    )


def job_events(*, chunks: int = 4, audio: float = 120.0, end: str = "result") -> list[pb.JobEvent]:
    """A plausible job log: queued, downloading, decoding, per-chunk progress and segments,
    then a Result (or an Error with the code named by `end`)."""
    T = pb  # short alias for the enum values
    events = [
        _progress(0, T.JOB_STATE_QUEUED, percent=0.0),
        _progress(1, T.JOB_STATE_DOWNLOADING, percent=2.0, bytes_done=1000, bytes_total=4000),
        _progress(2, T.JOB_STATE_DOWNLOADING, percent=5.0, bytes_done=4000, bytes_total=4000),
        _progress(3, T.JOB_STATE_DECODING, percent=6.0, audio_seconds_total=audio),
    ]
    step = audio / chunks
    for c in range(chunks):
        done = step * (c + 1)
        events.append(
            pb.JobEvent(
                index=len(events),
                job_id=JOB,
                state=T.JOB_STATE_TRANSCRIBING,
                segment=pb.Segment(id=c, start=done - step, end=done, text=f" words {c}"),
            )
        )
        events.append(
            _progress(
                len(events),
                T.JOB_STATE_TRANSCRIBING,
                percent=6 + 94 * (c + 1) / chunks,
                audio_seconds_done=done,
                audio_seconds_total=audio,
                chunk_index=c + 1,
                chunk_count=chunks,
                realtime_factor=30.0,
                eta_seconds=(chunks - c - 1) * 1.0,
            )
        )
    if end == "result":
        segments = [e.segment for e in events if e.WhichOneof("event") == "segment"]
        text = "".join(s.text for s in segments).strip()
        events.append(
            pb.JobEvent(
                index=len(events),
                job_id=JOB,
                state=T.JOB_STATE_SUCCEEDED,
                result=pb.Result(
                    text=text,
                    segments=segments,
                    language="en",
                    duration_seconds=audio,
                    formats=pb.Formats(
                        txt=text + "\n",
                        srt=f"1\n00:00:00,000 --> 00:00:30,000\n{text}\n",
                        vtt=f"WEBVTT\n\n00:00.000 --> 00:30.000\n{text}\n",
                        json=json.dumps({"text": text}),
                    ),
                ),
            )
        )
    else:
        code = getattr(grpc.StatusCode, end)
        events.append(
            pb.JobEvent(
                index=len(events),
                job_id=JOB,
                state=T.JOB_STATE_CANCELLED if end == "CANCELLED" else T.JOB_STATE_FAILED,
                error=pb.Error(code=code.value[0], code_name=end, message=f"the job ended {end}"),
            )
        )
    return events


# -- the in-test peer ------------------------------------------------------------------------


class FakeService(pb_grpc.TranscriptionServiceServicer):
    """Scripted server side: serves `events[job_id]` from the requested index; each entry of
    `drops` cuts one WatchJob call short after that many events (UNAVAILABLE, or a clean close
    when `drop_cleanly`)."""

    def __init__(self) -> None:
        self.events: dict[str, list[pb.JobEvent]] = {JOB: job_events()}
        self.drops: list[int] = []
        self.drop_cleanly = False
        self.ignore_from_index = False
        self.watch_from: list[int] = []
        self.submits: list[pb.SubmitJobRequest] = []
        self.upload_log: list[tuple[str, int]] = []
        self.upload_metadata: pb.UploadMetadata | None = None
        self.upload_digest = ""
        self.cancelled: list[str] = []
        self.auth: list[str] = []
        self.jobs = [
            pb.Job(job_id=f"j{i}", state=pb.JOB_STATE_SUCCEEDED, source=f"url:{i}")
            for i in range(5)
        ]
        self.list_requests: list[pb.ListJobsRequest] = []
        self.hold_after: int | None = None  # WatchJob stalls after this many events

    def _record_auth(self, context: grpc.ServicerContext) -> None:
        self.auth.append(dict(context.invocation_metadata()).get("authorization", ""))

    def _job(self, job_id: str, state: int = pb.JOB_STATE_QUEUED) -> pb.Job:
        return pb.Job(job_id=job_id, state=state, source="test")

    def SubmitJob(self, request, context):
        self._record_auth(context)
        self.submits.append(request)
        return self._job(JOB)

    def UploadAndSubmit(self, request_iterator, context):
        self._record_auth(context)
        digest = hashlib.sha256()
        for message in request_iterator:
            kind = message.WhichOneof("payload")
            if kind == "metadata":
                self.upload_metadata = message.metadata
                self.upload_log.append(("metadata", 0))
            else:
                self.upload_log.append(("chunk", len(message.chunk)))
                digest.update(message.chunk)
        self.upload_digest = digest.hexdigest()
        return self._job(JOB)

    def WatchJob(self, request, context):
        self._record_auth(context)
        self.watch_from.append(request.from_index)
        events = self.events.get(request.job_id)
        if events is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id!r}")
        limit = self.drops.pop(0) if self.drops else None
        start = 0 if self.ignore_from_index else request.from_index
        for sent, event in enumerate(events[start:]):
            if sent == self.hold_after:
                while context.is_active():  # a long job: nothing new until the client leaves
                    time.sleep(0.05)
                return
            if sent == limit:
                if self.drop_cleanly:
                    return
                context.abort(grpc.StatusCode.UNAVAILABLE, "server is restarting")
            yield event

    def GetJob(self, request, context):
        self._record_auth(context)
        events = self.events.get(request.job_id)
        if events is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id!r}")
        job = self._job(request.job_id, events[-1].state)
        job.event_count = len(events)
        if events[-1].HasField("error"):
            job.error.CopyFrom(events[-1].error)
        if request.include_result and events[-1].HasField("result"):
            job.result.CopyFrom(events[-1].result)
        return job

    def ListJobs(self, request, context):
        self._record_auth(context)
        self.list_requests.append(request)
        start = int(request.page_token or 0)
        end = start + (request.page_size or 50)
        token = str(end) if end < len(self.jobs) else ""
        return pb.ListJobsResponse(jobs=self.jobs[start:end], next_page_token=token)

    def CancelJob(self, request, context):
        self._record_auth(context)
        self.cancelled.append(request.job_id)
        return self._job(request.job_id, pb.JOB_STATE_CANCELLED)


@pytest.fixture
def peer():
    service = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_TranscriptionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(0).wait()


@pytest.fixture
def client(peer):
    _, target = peer
    with LongscribeClient(target, timeout=10, reconnect_attempts=3, reconnect_backoff=0.01) as c:
        yield c


@pytest.fixture
def media(tmp_path: Path) -> Path:
    path = tmp_path / "talk.flac"
    path.write_bytes(os.urandom(2 * MiB + 12345))
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("LONGSCRIBE_"):
            monkeypatch.delenv(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- watch: resume semantics -----------------------------------------------------------------


def test_watch_resumes_after_unavailable_every_event_once_in_order(peer, client, caplog):
    service, _ = peer
    service.drops = [3, 2, 4]
    seen = [e.index for e in client.watch(JOB)]
    assert seen == list(range(len(service.events[JOB])))
    assert service.watch_from == [0, 3, 5, 9]
    notices = [r.getMessage() for r in caplog.records if r.name == "longscribe.client"]
    assert len(notices) == 3 and "reconnecting from event 3" in notices[0]


def test_watch_starts_at_from_index_and_stops_at_terminal_event(peer, client):
    service, _ = peer
    events = list(client.watch(JOB, from_index=5))
    assert [e.index for e in events] == list(range(5, len(service.events[JOB])))
    assert events[-1].HasField("result")


def test_watch_drops_events_a_server_replays_twice(peer, client):
    service, _ = peer
    service.ignore_from_index = True  # a sloppy server that always replays from 0
    service.drops = [4, 6]
    seen = [e.index for e in client.watch(JOB)]
    assert seen == list(range(len(service.events[JOB])))


def test_watch_reconnects_after_a_stream_closed_before_the_end(peer, client):
    service, _ = peer
    service.drops = [2]
    service.drop_cleanly = True
    service.events[JOB][-1].state = pb.JOB_STATE_TRANSCRIBING  # GetJob: still running
    seen = [e.index for e in client.watch(JOB)]
    assert seen == list(range(len(service.events[JOB])))
    assert service.watch_from == [0, 2]


def _start_peer(service: FakeService, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TranscriptionServiceServicer_to_server(service, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def test_watch_survives_a_server_restart():
    first = FakeService()
    first.hold_after = 5  # the job is mid-way when this server goes down
    server, port = _start_peer(first)
    second = FakeService()
    seen: list[int] = []
    with LongscribeClient(f"127.0.0.1:{port}", reconnect_attempts=8, reconnect_backoff=0.05) as c:
        for event in c.watch(JOB):
            seen.append(event.index)
            if event.index == 4:
                server.stop(0).wait()  # the client now sees UNAVAILABLE and retries...
                server, _ = _start_peer(second, port)  # ...until the restarted one answers
    server.stop(0).wait()
    assert seen == list(range(len(second.events[JOB])))
    assert second.watch_from and set(second.watch_from) == {5}


def test_wait_until_ready_waits_for_a_server_that_starts_late(capsys):
    port = _free_port()
    service = FakeService()
    holder: list[grpc.Server] = []
    timer = threading.Timer(0.5, lambda: holder.append(_start_peer(service, port)[0]))
    timer.start()
    try:
        code = cli.main(["jobs", "get", JOB, "--server", f"127.0.0.1:{port}", "--wait", "20"])
        assert code == 0, capsys.readouterr().err
    finally:
        timer.join()
        for server in holder:
            server.stop(0).wait()
    with LongscribeClient(f"127.0.0.1:{_free_port()}") as c, pytest.raises(LongscribeError) as e:
        c.wait_until_ready(0.3)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_watch_retries_are_bounded(peer, client):
    service, _ = peer
    service.drops = [1] + [0] * 10  # one event, then the server never gets further
    seen = []
    with pytest.raises(LongscribeError) as info:
        for event in client.watch(JOB):
            seen.append(event.index)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert seen == [0]
    assert len(service.watch_from) == 1 + client.reconnect_attempts  # first call + retries


def test_watch_without_reconnect_raises_at_the_first_drop(peer, client):
    service, _ = peer
    service.drops = [2]
    with pytest.raises(LongscribeError) as info:
        list(client.watch(JOB, reconnect=False))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert service.watch_from == [0]


def test_watch_unknown_job_is_not_found_and_not_retried(peer, client):
    service, _ = peer
    with pytest.raises(LongscribeError) as info:
        list(client.watch("nope"))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "nope" in info.value.message
    assert service.watch_from == [0]


# -- submitting ------------------------------------------------------------------------------


def test_upload_streams_the_file_in_chunks_metadata_first(peer, client, media):
    service, _ = peer
    progress: list[tuple[int, int]] = []
    options = make_options(language="en")
    job = client.upload(
        media,
        options=options,
        request_id="r-1",
        chunk_size=MiB,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert job.job_id == JOB
    size = media.stat().st_size
    assert service.upload_log[0] == ("metadata", 0)
    assert [n for kind, n in service.upload_log[1:]] == [MiB, MiB, size - 2 * MiB]
    assert all(kind == "chunk" for kind, _ in service.upload_log[1:])
    meta = service.upload_metadata
    assert (meta.filename, meta.size_bytes, meta.request_id) == ("talk.flac", size, "r-1")
    assert meta.options.language == "en"
    assert service.upload_digest == hashlib.sha256(media.read_bytes()).hexdigest()
    assert progress == [(MiB, size), (2 * MiB, size), (size, size)]


def test_upload_of_a_missing_file_is_invalid_argument(client, tmp_path):
    with pytest.raises(LongscribeError) as info:
        client.upload(tmp_path / "missing.wav")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_submit_picks_upload_url_or_server_path(peer, client, media):
    service, _ = peer
    client.submit("https://example.com/talk.mp3", request_id="abc")
    client.submit("lectures/a.mp3", server_path=True)
    client.submit(media)
    assert service.submits[0].url == "https://example.com/talk.mp3"
    assert service.submits[0].request_id == "abc"
    assert service.submits[1].server_path == "lectures/a.mp3"
    assert service.submits[1].request_id  # always sent, so retries are idempotent
    assert service.upload_metadata.filename == "talk.flac"
    with pytest.raises(LongscribeError) as info:
        client.submit("ftp://example.com/x.mp3")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(service.submits) == 2


def test_token_is_sent_as_bearer_metadata(peer):
    service, target = peer
    with LongscribeClient(target, token="s3cret", reconnect_backoff=0.01) as c:
        c.transcribe("https://example.com/a.mp3")
        c.get(JOB)
    assert service.auth and set(service.auth) == {"Bearer s3cret"}


def test_transcribe_returns_the_result_and_reports_every_event(peer, client):
    service, _ = peer
    service.drops = [5]
    seen: list[int] = []
    jobs: list[str] = []
    result = client.transcribe(
        "https://example.com/a.mp3",
        on_event=lambda e: seen.append(e.index),
        on_job=lambda j: jobs.append(j.job_id),
    )
    assert jobs == [JOB]
    assert seen == list(range(len(service.events[JOB])))
    assert result == service.events[JOB][-1].result


@pytest.mark.parametrize("end", ["INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "CANCELLED"])
def test_a_job_ending_in_error_raises_its_code(peer, client, end):
    service, _ = peer
    service.events[JOB] = job_events(end=end)
    with pytest.raises(LongscribeError) as info:
        client.transcribe("https://example.com/a.mp3")
    assert info.value.code == getattr(grpc.StatusCode, end)
    assert info.value.message == f"the job ended {end}"
    assert info.value.job_id == JOB


def test_wait_from_past_the_end_asks_for_the_outcome(peer, client):
    service, _ = peer
    n = len(service.events[JOB])
    assert client.wait(JOB, from_index=n) == service.events[JOB][-1].result


# -- other calls and error mapping -----------------------------------------------------------


def test_list_follows_page_tokens_and_sends_states(peer, client):
    service, _ = peer
    jobs = list(client.list(states=["succeeded", pb.JOB_STATE_FAILED], page_size=2))
    assert [j.job_id for j in jobs] == [f"j{i}" for i in range(5)]
    assert [r.page_token for r in service.list_requests] == ["", "2", "4"]
    assert list(service.list_requests[0].states) == [pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED]


def test_rpc_errors_become_longscribe_errors(client):
    with pytest.raises(LongscribeError) as info:
        client.get("missing")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert str(info.value).startswith("NOT_FOUND: ")


def test_unreachable_server_is_unavailable():
    with (
        LongscribeClient(f"127.0.0.1:{_free_port()}", timeout=5) as c,
        pytest.raises(LongscribeError) as info,
    ):
        c.get("x")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_tls_with_a_private_ca_and_client_certificate(tmp_path, capsys):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("client.example")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    service = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TranscriptionServiceServicer_to_server(service, server)
    creds = grpc.ssl_server_credentials(
        [
            (
                server_cert.private_key_pem.bytes(),
                b"".join(pem.bytes() for pem in server_cert.cert_chain_pems),
            )
        ],
        root_certificates=ca.cert_pem.bytes(),
        require_client_auth=True,
    )
    target = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', creds)}"
    server.start()
    try:
        with LongscribeClient(
            target,
            tls_ca=str(tmp_path / "ca.pem"),
            tls_cert=str(tmp_path / "client.pem"),
            tls_key=str(tmp_path / "client.key"),
            token="t",
            timeout=10,
        ) as c:
            assert c.get(JOB).job_id == JOB
        assert service.auth == ["Bearer t"]
        # Without the client certificate the handshake fails: UNAVAILABLE, exit status 4.
        code = cli.main(
            [
                "jobs",
                "get",
                JOB,
                "--server",
                target,
                "--tls-ca",
                str(tmp_path / "ca.pem"),
                "--timeout",
                "5",
            ]
        )
        assert code == 4
        code = cli.main(
            [
                "jobs",
                "get",
                JOB,
                "--server",
                target,
                "--tls-ca",
                str(tmp_path / "ca.pem"),
                "--client-cert",
                str(tmp_path / "client.pem"),
                "--client-key",
                str(tmp_path / "client.key"),
            ]
        )
        assert code == 0
        assert JOB in capsys.readouterr().out
    finally:
        server.stop(0).wait()


def test_status_code_mapping_and_state_names():
    assert status_code(3) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(1) is grpc.StatusCode.CANCELLED
    assert status_code(999) is grpc.StatusCode.UNKNOWN
    assert state_value("queued") == state_value("JOB_STATE_QUEUED") == pb.JOB_STATE_QUEUED
    with pytest.raises(ValueError):
        state_value("bogus")


def test_client_certificate_needs_its_key():
    with pytest.raises(ValueError):
        LongscribeClient("127.0.0.1:1", tls_cert="cert.pem")


# -- progress rendering ----------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_writes_a_line_per_phase_and_throttles():
    out = io.StringIO()
    clock = _Clock()
    view = LogProgress(out, interval=10.0, clock=clock)
    with view:
        view.on_upload(MiB, 4 * MiB)
        view.on_upload(4 * MiB, 4 * MiB)
        for event in job_events(chunks=4):
            clock.now += 1.0  # 1 s apart: only phase changes pass the 10 s throttle
            view.on_event(event)
    lines = out.getvalue().splitlines()
    phases = [line.split(":")[1].strip() for line in lines]
    assert phases == [
        "uploading",
        "uploading",
        "queued",
        "downloading",
        "decoding",
        "transcribing",
        "done",
    ]
    assert "\r" not in out.getvalue()
    assert "30 of 120 s audio" in lines[5] and "×30.0 real time" in lines[5]
    assert lines[-1].endswith("120.0 s audio, 4 segments, language en")


def test_log_progress_repeats_a_phase_after_the_interval():
    out = io.StringIO()
    clock = _Clock()
    view = LogProgress(out, interval=10.0, clock=clock)
    for event in job_events(chunks=4)[4:]:  # segment, progress, segment, progress...
        clock.now += 3.0
        view.on_event(event)
    transcribing = [line for line in out.getvalue().splitlines() if "transcribing" in line]
    assert len(transcribing) == 2  # progress at 6, 12, 18, 24 s: shown at 6 and 18


def test_bar_progress_renders_both_bars_and_closes_them():
    out = io.StringIO()
    with BarProgress(out, mininterval=0) as view:
        view.on_upload(MiB, 2 * MiB)
        for event in job_events(chunks=3, audio=90.0):
            view.on_event(event)
        assert view._bytes is None and view._audio is None  # the result closed them
    text = out.getvalue()
    for word in ("uploading", "downloading", "transcribing", "done"):
        assert word in text
    assert "90/90 s audio" in text
    assert "100%" in text


def test_bar_progress_closes_on_error_and_on_exit():
    out = io.StringIO()
    view = BarProgress(out)
    view.on_upload(10, 100)
    view.message("longscribe: job job-1")
    assert view._bytes is None  # the job exists: the upload bar is done
    for event in job_events(end="INVALID_ARGUMENT")[:6]:
        view.on_event(event)
    assert view._audio is not None
    view.on_event(job_events(end="INVALID_ARGUMENT")[-1])
    assert view._audio is None and view._bytes is None
    assert "longscribe: job job-1\n" in out.getvalue()
    with BarProgress(io.StringIO()) as view2:
        view2.on_upload(10, 100)
    assert view2._bytes is None


def test_make_progress_modes_without_a_tty():
    out = io.StringIO()
    assert isinstance(make_progress("auto", out), LogProgress)
    assert isinstance(make_progress("bars", out), BarProgress)
    quiet = make_progress("off", out)
    assert type(quiet) is ProgressView
    for event in job_events():
        quiet.on_event(event)
    assert out.getvalue() == ""
    with pytest.raises(ValueError):
        make_progress("loud", out)


# -- output ------------------------------------------------------------------------------------


def test_write_transcript_to_a_file_and_stdout(tmp_path):
    target = tmp_path / "out.srt"
    write_transcript("1\nhello", target)
    assert target.read_text() == "1\nhello\n"
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["out.srt"]  # no temp file left
    out = io.StringIO()
    write_transcript("text\n", "-", out)
    assert out.getvalue() == "text\n"


def test_transcript_text_picks_the_format():
    result = job_events()[-1].result
    assert transcript_text(result, "srt") == result.formats.srt
    assert transcript_text(result, "json") == result.formats.json
    bare = pb.Result(text="only text")
    assert transcript_text(bare, "txt") == "only text"
    with pytest.raises(ValueError):
        transcript_text(result, "docx")


# -- CLI ---------------------------------------------------------------------------------------


def test_parser_reads_env_defaults_and_flags_override(monkeypatch):
    monkeypatch.setenv("LONGSCRIBE_SERVER", "example.org:443")
    monkeypatch.setenv("LONGSCRIBE_TOKEN", "tok")
    monkeypatch.setenv("LONGSCRIBE_TLS_CA", "/ca.pem")
    monkeypatch.setenv("LONGSCRIBE_FORMAT", "vtt")
    ns = cli.build_parser().parse_args(["transcribe", "a.mp3"])
    assert (ns.server, ns.token, ns.tls_ca, ns.format) == (
        "example.org:443",
        "tok",
        "/ca.pem",
        "vtt",
    )
    ns = cli.build_parser().parse_args(
        [
            "transcribe",
            "a.mp3",
            "--server",
            "h:1",
            "--format",
            "json",
            "-o",
            "x.json",
            "--language",
            "de",
            "--task",
            "translate",
            "--prompt",
            "Names",
            "--detach",
        ]
    )
    assert (ns.server, ns.format, ns.output, ns.language, ns.task, ns.prompt, ns.detach) == (
        "h:1",
        "json",
        "x.json",
        "de",
        "translate",
        "Names",
        True,
    )
    ns = cli.build_parser().parse_args(["jobs", "list", "--state", "queued", "FAILED", "--json"])
    assert ns.state == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_FAILED] and ns.json
    ns = cli.build_parser().parse_args(["jobs", "watch", "abc", "--from", "7"])
    assert (ns.job_id, ns.from_index, ns.server) == ("abc", 7, "example.org:443")


def test_usage_errors_exit_2(capsys, tmp_path, monkeypatch):
    assert cli.main(["transcribe", "x.mp3", "--format", "docx"]) == 2
    assert cli.main(["transcribe", str(tmp_path / "missing.mp3")]) == 2
    assert "neither an existing local file" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    capsys.readouterr()
    monkeypatch.setenv("LONGSCRIBE_FORMAT", "docx")  # env defaults are checked too
    assert cli.main(["transcribe", "https://example.com/a.mp3"]) == 2
    assert "LONGSCRIBE_FORMAT='docx'" in capsys.readouterr().err
    monkeypatch.setenv("LONGSCRIBE_FORMAT", "srt")
    monkeypatch.setenv("LONGSCRIBE_TIMEOUT", "soon")
    assert cli.main(["jobs", "list"]) == 2
    assert "LONGSCRIBE_TIMEOUT" in capsys.readouterr().err
    monkeypatch.delenv("LONGSCRIBE_TIMEOUT")
    assert cli.main(["--help"]) == 0
    assert "exit status" in capsys.readouterr().out


def test_cli_transcribe_writes_the_chosen_format_to_a_file(peer, media, tmp_path, capsys):
    service, target = peer
    out = tmp_path / "talk.srt"
    code = cli.main(
        [
            "transcribe",
            str(media),
            "--server",
            target,
            "--format",
            "srt",
            "-o",
            str(out),
            "--no-progress",
            "--language",
            "en",
        ]
    )
    assert code == 0
    assert out.read_text() == service.events[JOB][-1].result.formats.srt
    assert service.upload_metadata.options.language == "en"
    assert capsys.readouterr().out == ""


def test_cli_transcribe_prints_to_stdout_with_log_progress_on_stderr(peer, monkeypatch, capsys):
    service, target = peer
    monkeypatch.setenv("LONGSCRIBE_SERVER", target)
    monkeypatch.setenv("LONGSCRIBE_FORMAT", "vtt")
    assert cli.main(["transcribe", "https://example.com/a.mp3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == service.events[JOB][-1].result.formats.vtt
    assert f"job {JOB}" in captured.err and "transcribing" in captured.err  # not a TTY: lines
    assert "reconnecting" not in captured.err


def test_cli_transcribe_reports_a_reconnect_on_stderr(peer, capsys):
    service, target = peer
    service.drops = [6]
    assert cli.main(["transcribe", "https://example.com/a.mp3", "--server", target]) == 0
    captured = capsys.readouterr()
    assert captured.out == service.events[JOB][-1].result.formats.txt
    assert "UNAVAILABLE: server is restarting); reconnecting from event 6" in captured.err


@pytest.mark.parametrize(
    ("end", "status"),
    # a job that fails UNAVAILABLE (its media URL unreachable) is a failed job, 1; 4 means the
    # server itself could not be reached
    [("INVALID_ARGUMENT", 1), ("FAILED_PRECONDITION", 1), ("CANCELLED", 3), ("UNAVAILABLE", 1)],
)
def test_cli_exit_status_of_a_job_ending_in_error(peer, capsys, end, status):
    service, target = peer
    service.events[JOB] = job_events(end=end)
    code = cli.main(
        ["transcribe", "https://example.com/a.mp3", "--server", target, "--no-progress"]
    )
    assert code == status
    assert capsys.readouterr().err.strip().endswith(f"error: {end}: the job ended {end}")


def test_output_into_a_missing_folder_is_refused_before_any_job(capsys, tmp_path):
    code = cli.main(["transcribe", "https://example.com/a.mp3", "-o",
                     str(tmp_path / "no" / "such" / "t.srt"), "--server", "127.0.0.1:1"])
    assert code == 2
    assert "its folder does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("given", "dialled"), [
    ("example.com", "example.com:50051"), ("example.com:443", "example.com:443"),
    ("10.0.0.1", "10.0.0.1:50051"), ("::1", "[::1]:50051"), ("[::1]", "[::1]:50051"),
    ("[::1]:7000", "[::1]:7000"), ("unix:/tmp/s.sock", "unix:/tmp/s.sock"),
    ("dns:///example.com:9000", "dns:///example.com:9000"),
])
def test_server_without_a_port_means_the_default_port(given, dialled):
    from longscribe.client.client import with_default_port

    assert with_default_port(given) == dialled


def test_cli_jobs_get_prints_the_transcript_in_a_format(peer, capsys):
    service, target = peer
    assert cli.main(["transcribe", "https://example.com/a.mp3", "--server", target,
                     "--detach"]) == 0
    capsys.readouterr()
    code = cli.main(["jobs", "get", JOB, "--format", "srt", "--server", target])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out == service.events[JOB][-1].result.formats.srt


def test_cli_cannot_connect_exits_4(capsys):
    code = cli.main(["jobs", "list", "--server", f"127.0.0.1:{_free_port()}"])
    assert code == 4
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_cli_ctrl_c_cancels_the_job_and_exits_130(peer, monkeypatch, capsys):
    service, target = peer

    class Interrupting(ProgressView):
        def on_event(self, event):
            if event.index == 4:
                raise KeyboardInterrupt

    monkeypatch.setattr(cli, "make_progress", lambda mode, file: Interrupting())
    code = cli.main(["transcribe", "https://example.com/a.mp3", "--server", target])
    assert code == 130
    assert service.cancelled == [JOB]
    assert f"cancelled job {JOB}" in capsys.readouterr().err


def test_cli_sigint_in_a_real_process_cancels_the_job(peer):
    service, target = peer
    service.hold_after = 6
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "longscribe.client",
            "transcribe",
            "https://example.com/a.mp3",
            "--server",
            target,
            "--progress",
            "log",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a terminal's Ctrl-C: SIGINT at its default even where this test runs with it ignored
        # (a shell's background job), which the child would inherit and Python keep
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # Wait until the job is being watched (its first progress line), then press Ctrl-C.
        for line in proc.stderr:
            if "longscribe: transcribing:" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert service.cancelled == [JOB]
    assert out == ""


def test_cli_detach_only_submits(peer, capsys):
    service, target = peer
    assert (
        cli.main(
            [
                "transcribe",
                "https://example.com/a.mp3",
                "--server",
                target,
                "--detach",
                "--request-id",
                "rid-9",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == JOB
    assert service.submits[0].request_id == "rid-9"
    assert service.watch_from == []


def test_cli_jobs_watch_json_lines_round_trip(peer, capsys):
    service, target = peer
    service.drops = [3]
    assert cli.main(["jobs", "watch", JOB, "--server", target, "--json", "--from", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    parsed = [json_format.Parse(line, pb.JobEvent()) for line in lines]
    assert parsed == service.events[JOB][1:]


def test_cli_jobs_watch_human_and_failed_exit(peer, capsys):
    service, target = peer
    service.events[JOB] = job_events(end="RESOURCE_EXHAUSTED")
    assert cli.main(["jobs", "watch", JOB, "--server", target]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(service.events[JOB])
    assert lines[0].startswith("#0 queued")
    assert "[00:00.000 --> 00:30.000] words 0" in lines[4]
    assert lines[-1].endswith("error: RESOURCE_EXHAUSTED: the job ended RESOURCE_EXHAUSTED")


def test_cli_jobs_watch_past_the_end_exits_with_the_jobs_outcome(peer, capsys):
    service, target = peer
    service.events[JOB] = job_events(end="CANCELLED")
    n = len(service.events[JOB])
    assert cli.main(["jobs", "watch", JOB, "--server", target, "--from", str(n)]) == 3
    assert capsys.readouterr().out == ""


def test_cli_jobs_list_get_cancel(peer, capsys):
    service, target = peer
    assert cli.main(["jobs", "list", "--server", target]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["JOB", "ID", "STATE", "DONE", "CREATED", "SOURCE"]
    assert [row.split()[0] for row in table[1:]] == [f"j{i}" for i in range(5)]
    assert cli.main(["jobs", "list", "--server", target, "--json", "--state", "succeeded"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["jobId"] for r in rows] == [f"j{i}" for i in range(5)]
    assert list(service.list_requests[-1].states) == [pb.JOB_STATE_SUCCEEDED]

    assert cli.main(["jobs", "get", JOB, "--server", target, "--result"]) == 0
    text = capsys.readouterr().out
    assert "state:" in text and "SUCCEEDED" in text and "words 0 words 1" in text
    assert cli.main(["jobs", "get", JOB, "--server", target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "JOB_STATE_SUCCEEDED"
    assert cli.main(["jobs", "get", "nope", "--server", target]) == 1
    assert "error: NOT_FOUND" in capsys.readouterr().err

    assert cli.main(["jobs", "cancel", JOB, "--server", target]) == 0
    assert service.cancelled == [JOB]
    assert "CANCELLED" in capsys.readouterr().out


def test_client_import_and_help_need_no_server_packages():
    code = (
        "import sys\n"
        "from longscribe.client import cli\n"
        "assert cli.main(['--help']) == 0\n"
        "assert cli.main(['transcribe', '--help']) == 0\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'whisper', 'yt_dlp')"
        " or m.startswith('longscribe.service')]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "longscribe transcribe" in proc.stdout


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "longscribe.client", "jobs", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "watch" in proc.stdout


def test_serve_without_server_packages_says_which_extra(monkeypatch, capsys):
    # Simulate a client-only install: the server's third-party imports are missing.
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name.split(".")[0] in ("torch", "whisper") or name.startswith("longscribe.service"):
            raise ModuleNotFoundError(f"No module named {name!r}", name="torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert cli.main(["serve", "--port", "0"]) == 2
    assert "pip install 'longscribe[server]'" in capsys.readouterr().err

"""End to end through a real server process: uploads, yt-dlp downloads from a local HTTP server,
server paths, grpcurl, bad input, and cancellation (issue 2, "What it must show")."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import grpc
import psutil
import pytest
from longscribe.client.client import LongscribeClient, LongscribeError
from longscribe.v1 import transcription_pb2 as pb

from tests.conftest import JFK, LJ, ServerProcess, ffmpeg, jfk_text, lj_text, wer
from tests.grpcurl import run_grpcurl
from tests.httpserver import serve_directory

SERVICE = "longscribe.v1.TranscriptionService"


@pytest.fixture(scope="module")
def lj_media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The LJSpeech reading as mp3, and as mp4 with a video track."""
    folder = tmp_path_factory.mktemp("lj-media")
    mp3 = folder / "lj.mp3"
    ffmpeg("-i", str(LJ), "-ac", "1", "-b:a", "64k", str(mp3))
    mp4 = folder / "lj.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=navy:s=160x120:r=5", "-i", str(LJ), "-shortest",
           "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-b:a", "64k", str(mp4))
    return {"mp3": mp3, "mp4": mp4}


def _children(server: ServerProcess) -> list[str]:
    names = []
    for child in psutil.Process(server.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            names.append(child.name())
    return names


def test_upload_jfk_transcribes_accurately(client: LongscribeClient) -> None:
    events: list[pb.JobEvent] = []
    result = client.transcribe(str(JFK), on_event=events.append)
    assert wer(jfk_text(), result.text) <= 0.05, result.text
    assert result.language == "en"
    assert 10.5 < result.duration_seconds < 11.5
    assert result.segments and result.segments[0].start < 1.0
    assert "-->" in result.formats.srt and result.formats.vtt.startswith("WEBVTT")
    assert json.loads(result.formats.json)["text"].strip() == result.text
    kinds = [e.WhichOneof("event") for e in events]
    assert "segment" in kinds and kinds[-1] == "result"
    assert [e.index for e in events] == list(range(len(events)))


@pytest.mark.parametrize("kind", ["mp3", "mp4"])
def test_url_download_with_progress(client: LongscribeClient, lj_media: dict[str, Path],
                                    kind: str) -> None:
    with serve_directory(lj_media[kind].parent) as http:
        job = client.submit_url(http.url_for(lj_media[kind].name))
        events = list(client.watch(job.job_id))
        assert http.hits(lj_media[kind].name) >= 1
    result_events = [e for e in events if e.HasField("result")]
    assert result_events, [e for e in events if e.HasField("error")]
    text = result_events[0].result.text
    assert wer(lj_text(), text) <= 0.08, text
    progress = [e.progress for e in events if e.HasField("progress")]
    percents = [p.percent for p in progress]
    assert percents == sorted(percents), "percent went down"
    phases = [p.phase for p in progress]
    assert pb.JOB_STATE_DOWNLOADING in phases and pb.JOB_STATE_TRANSCRIBING in phases
    assert phases.index(pb.JOB_STATE_DOWNLOADING) < phases.index(pb.JOB_STATE_TRANSCRIBING)
    # mp3 is decoded while it downloads, so later byte counts come in the transcribing phase.
    with_bytes = [p for p in progress if p.bytes_total]
    assert with_bytes[-1].bytes_done == with_bytes[-1].bytes_total == lj_media[kind].stat().st_size
    assert [e.index for e in events] == list(range(len(events)))


def test_server_path_under_media_root(client: LongscribeClient) -> None:
    job = client.submit_path("jfk.flac")
    result = client.wait(job.job_id)
    assert wer(jfk_text(), result.text) <= 0.05


def test_grpcurl_reflection_and_health(server: ServerProcess) -> None:
    listing = run_grpcurl("-plaintext", server.target, "list")
    assert listing.returncode == 0, listing.stderr
    assert SERVICE in listing.stdout.split()
    assert "grpc.health.v1.Health" in listing.stdout
    described = run_grpcurl("-plaintext", server.target, "describe", SERVICE)
    assert described.returncode == 0, described.stderr
    for method in ("SubmitJob", "UploadAndSubmit", "WatchJob", "Transcribe", "GetJob",
                   "ListJobs", "CancelJob"):
        assert f"rpc {method}" in described.stdout
    health = run_grpcurl("-plaintext", server.target, "grpc.health.v1.Health/Check")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "SERVING"


def test_grpcurl_submit_and_get(server: ServerProcess) -> None:
    submitted = run_grpcurl("-plaintext", "-d", json.dumps({"serverPath": "jfk.flac"}),
                            server.target, f"{SERVICE}/SubmitJob")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    job_id = job.get("job_id") or job["jobId"]  # grpcurl 1.8 prints proto field names
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        request = json.dumps({"job_id": job_id, "include_result": True})
        got = run_grpcurl("-plaintext", "-d", request, server.target, f"{SERVICE}/GetJob")
        body = json.loads(got.stdout)
        if body["state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"):
            break
        time.sleep(0.5)
    assert body["state"] == "JOB_STATE_SUCCEEDED", body
    assert wer(jfk_text(), body["result"]["text"]) <= 0.05


# --- bad input: a clear status, and the server keeps serving ---------------------------------

def _assert_still_serving(client: LongscribeClient) -> None:
    result = client.transcribe("jfk.flac", server_path=True)
    assert "country" in result.text.lower()


def test_text_file_uploaded_as_media_fails_clearly(client: LongscribeClient,
                                                   server: ServerProcess,
                                                   tmp_path: Path) -> None:
    notes = tmp_path / "notes.mp3"
    notes.write_text("this is not audio at all\n" * 200)
    with pytest.raises(LongscribeError) as err:
        client.transcribe(str(notes))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "media" in str(err.value).lower() or "decode" in str(err.value).lower()
    assert str(server.data_dir) not in str(err.value)  # no server-side paths
    _assert_still_serving(client)


def test_empty_upload_is_refused(client: LongscribeClient, tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(LongscribeError) as err:
        client.upload(str(empty))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in str(err.value).lower()


def test_url_that_404s_fails_after_bounded_retries(client: LongscribeClient,
                                                   tmp_path: Path) -> None:
    with serve_directory(tmp_path) as http:
        job = client.submit_url(http.url_for("missing.mp3"))
        with pytest.raises(LongscribeError) as err:
            client.wait(job.job_id)
        assert 1 <= http.hits("missing.mp3") <= 4
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "404" in str(err.value)
    assert client.get(job.job_id).state == pb.JOB_STATE_FAILED


def test_unknown_job_is_not_found(client: LongscribeClient) -> None:
    for call in (client.get, client.cancel):
        with pytest.raises(LongscribeError) as err:
            call("no-such-job")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(LongscribeError) as err:
        list(client.watch("no-such-job"))
    assert err.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "sub/../../x.flac"])
def test_path_outside_media_root_is_refused(client: LongscribeClient, path: str) -> None:
    with pytest.raises(LongscribeError) as err:
        client.submit_path(path)
    assert err.value.code in (grpc.StatusCode.PERMISSION_DENIED,
                              grpc.StatusCode.INVALID_ARGUMENT)
    _assert_still_serving(client)


def test_bad_options_are_invalid_argument(client: LongscribeClient) -> None:
    with pytest.raises(LongscribeError) as err:
        client.submit_path("jfk.flac", options=pb.TranscriptionOptions(task="summarise"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_request_id_makes_submit_idempotent(client: LongscribeClient) -> None:
    first = client.submit_path("jfk.flac", request_id="same-request-42")
    again = client.submit_path("jfk.flac", request_id="same-request-42")
    assert first.job_id == again.job_id
    # the same id for a different request is refused, naming the job it belongs to
    with pytest.raises(LongscribeError) as err:
        client.submit_path("jfk.flac", request_id="same-request-42",
                           options=pb.TranscriptionOptions(initial_prompt="other"))
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert first.job_id in str(err.value)
    client.wait(first.job_id)


# --- cancellation ---------------------------------------------------------------------------

def test_cancel_during_transcription(client: LongscribeClient, server: ServerProcess,
                                     tmp_path: Path) -> None:
    long_media = tmp_path / "long.mp3"
    ffmpeg("-stream_loop", "5", "-i", str(LJ), "-ac", "1", "-b:a", "32k", str(long_media))
    job = client.upload(str(long_media))
    job_dir = server.data_dir / "jobs" / job.job_id
    for event in client.watch(job.job_id):
        if event.HasField("segment"):
            break  # transcription is under way
    assert job_dir.exists()
    started = time.monotonic()
    client.cancel(job.job_id)
    with pytest.raises(LongscribeError) as err:
        client.wait(job.job_id)
    elapsed = time.monotonic() - started
    assert err.value.code == grpc.StatusCode.CANCELLED
    assert elapsed < 2.0, f"cancel took {elapsed:.2f} s"
    assert client.get(job.job_id).state == pb.JOB_STATE_CANCELLED
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and (job_dir.exists() or "ffmpeg" in _children(server)):
        time.sleep(0.05)
    assert not job_dir.exists(), "job directory left behind"
    assert not (server.data_dir / "tmp" / job.job_id).exists(), "decode temp dir left behind"
    assert not {"ffmpeg", "yt-dlp"} & set(_children(server)), _children(server)


def test_list_jobs_pages_and_filters(client: LongscribeClient) -> None:
    jobs = list(client.list(page_size=2))
    assert len(jobs) >= 3
    seqs = [j.create_time.ToNanoseconds() for j in jobs]
    assert seqs == sorted(seqs, reverse=True)
    failed = list(client.list(states=[pb.JOB_STATE_FAILED]))
    assert failed and all(j.state == pb.JOB_STATE_FAILED for j in failed)


def test_mp3_is_transcribed_while_it_downloads(client: LongscribeClient,
                                               lj_media: dict[str, Path]) -> None:
    """Issue 4: decoding starts before the download ends where the container allows it."""
    size = lj_media["mp3"].stat().st_size
    with serve_directory(lj_media["mp3"].parent) as http:
        http.throttle(size / 20)  # about 20 s of download: room for a slow first window
        job = client.submit_url(http.url_for("lj.mp3"))
        events = list(client.watch(job.job_id))
    first_segment = next(e.index for e in events if e.HasField("segment"))
    download_done = next(e.index for e in events
                         if e.HasField("progress") and e.progress.bytes_done == size)
    assert first_segment < download_done, "no segment arrived before the download ended"
    progress = [e.progress for e in events if e.HasField("progress")]
    # the phase only moves forward, and the percent moves past the download's share while
    # the audio is transcribed as it arrives (the length is estimated from the bytes)
    phases = [p.phase for p in progress]
    assert phases == sorted(phases), [pb.JobState.Name(p) for p in phases]
    before_done = [p.percent for p in progress[:[p.bytes_done for p in progress].index(size)]]
    assert max(before_done) > 40, before_done
    result = events[-1].result
    assert wer(lj_text(), result.text) <= 0.08
    assert abs(result.duration_seconds - 234.1) < 1.0


def test_progress_moves_during_a_long_batch(client: LongscribeClient) -> None:
    """The whole 234 s reading is one CPU batch of windows: percent, position and ETA still
    move at least every ~2 s while it decodes, and phases never go back."""
    job = client.upload(LJ)
    seen: list[tuple[float, pb.Progress]] = []
    for event in client.watch(job.job_id):
        if event.HasField("progress"):
            seen.append((time.monotonic(), event.progress))
    phases = [p.phase for _, p in seen]
    assert phases == sorted(phases), [pb.JobState.Name(p) for p in phases]
    moving = [(t, p.percent) for t, p in seen if p.phase == pb.JOB_STATE_TRANSCRIBING]
    rises = [moving[0][0]] + [b[0] for a, b in zip(moving, moving[1:], strict=False)
                              if b[1] > a[1]]
    assert len(rises) >= 4, moving
    gaps = [b - a for a, b in zip(rises, rises[1:], strict=False)]
    assert max(gaps) <= 2.5, gaps
    assert sum(p.eta_seconds > 0 for _, p in seen if p.phase == pb.JOB_STATE_TRANSCRIBING) >= 3


@pytest.mark.parametrize("options", [pb.TranscriptionOptions(language="fr"),
                                     pb.TranscriptionOptions(task="translate")])
def test_english_only_model_refuses_other_languages(client: LongscribeClient,
                                                    options: pb.TranscriptionOptions) -> None:
    client.wait_until_ready(120)
    with pytest.raises(LongscribeError) as err:
        client.submit_path("jfk.flac", options=options)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "English-only" in str(err.value)


def test_truncated_mp3_reports_what_was_decoded(client: LongscribeClient,
                                                lj_media: dict[str, Path],
                                                tmp_path: Path) -> None:
    """The mp3's LAME header promises 234 s; the file holds the first ~60 %: the result's
    duration is what was decoded, not the header's."""
    data = lj_media["mp3"].read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    result = client.transcribe(cut)
    assert 0.55 * 234 < result.duration_seconds < 0.65 * 234, result.duration_seconds
    assert result.segments[-1].end <= result.duration_seconds + 0.5

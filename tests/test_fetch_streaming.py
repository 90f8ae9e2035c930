"""Decoding while the download is still running: fetch.start_download + AudioStreamContext
(growing=) against a throttled local HTTP server, real yt-dlp and real ffmpeg."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import psutil
import pytest
from longscribe.service import fetch
from longscribe.service.audio import AudioStreamContext, can_stream_while_growing
from longscribe.service.errors import Cancelled, JobError

from tests.conftest import JFK, ROOT, ffmpeg, require_testdata
from tests.httpserver import LocalServer, serve_directory

FAST = fetch.RetryPolicy(max_total_seconds=20.0, initial_wait=0.05, max_wait=0.2)
MP3_END_PADDING = 1152  # see tests/test_audio.py: a piped mp3 keeps at most one padding frame


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_testdata()
    folder = tmp_path_factory.mktemp("served")
    # 33 s of speech: about 260 kB as 64 kb/s mp3, a few seconds at the throttled rates below
    ffmpeg("-stream_loop", "2", "-i", str(JFK), "-ac", "1", "-b:a", "64k",
           str(folder / "talk.mp3"))
    # a plain mp4: ffmpeg writes the moov index after the media data unless told +faststart
    ffmpeg("-i", str(JFK), "-ac", "1", "-c:a", "aac", "-b:a", "64k", str(folder / "jfk.m4a"))
    return folder


@pytest.fixture
def server(media: Path) -> Iterator[LocalServer]:
    with serve_directory(media) as s:
        yield s


def _start(url: str, dest: Path, **kw: object) -> fetch.DownloadHandle:
    kw.setdefault("allow_private_networks", True)
    kw.setdefault("retry_policy", FAST)
    return fetch.start_download(url, dest, **kw)


def _samples(path: Path) -> int:
    with AudioStreamContext(path, chunk_seconds=30.0) as s:
        return sum(c.num_samples for c in s.chunks())


def test_mp3_decodes_while_it_downloads(server: LocalServer, media: Path, tmp_path: Path) -> None:
    server.throttle(80_000)
    dest = tmp_path / "dl"
    handle = _start(server.url_for("talk.mp3"), dest)
    assert handle.file_ready.wait(10)
    path = handle.partial_path
    assert path is not None and path.parent == dest and handle.container_hint == ".mp3"
    assert can_stream_while_growing(path) and not handle.finished.is_set()
    finished_at_first_chunk: bool | None = None
    streamed = 0
    with AudioStreamContext(path, chunk_seconds=1.0, growing=handle.finished) as s:
        for chunk in s.chunks():
            if finished_at_first_chunk is None:
                finished_at_first_chunk = handle.finished.is_set()
            streamed += chunk.num_samples
    final = handle.result(timeout=5)
    assert finished_at_first_chunk is False  # decoding really began before the download ended
    assert final == path and not handle.restarted.is_set()
    assert final.read_bytes() == (media / "talk.mp3").read_bytes()
    assert list(dest.iterdir()) == [final]  # work folder gone, one name for the file
    reference = _samples(final)
    assert reference > 30 * 16000
    assert 0 <= streamed - reference <= MP3_END_PADDING


def test_resumed_retry_keeps_the_stream(server: LocalServer, media: Path, tmp_path: Path) -> None:
    # the first body breaks off; the retry asks for the rest with Range and appends to the
    # same file, so the reader tailing it sees one continuous mp3
    server.throttle(120_000)
    server.truncate("talk.mp3", 60_000, times=2)  # yt-dlp's first GET only looks at headers
    handle = _start(server.url_for("talk.mp3"), tmp_path, retries=2)
    assert handle.file_ready.wait(10)
    path = handle.partial_path
    assert path is not None
    with AudioStreamContext(path, chunk_seconds=5.0, growing=handle.finished) as s:
        streamed = sum(c.num_samples for c in s.chunks())
    final = handle.result(timeout=5)
    assert not handle.restarted.is_set() and final == path
    assert [h.status for h in server.log if h.range and h.path == "/talk.mp3"] == [206]
    assert final.read_bytes() == (media / "talk.mp3").read_bytes()
    assert 0 <= streamed - _samples(final) <= MP3_END_PADDING


@contextlib.contextmanager
def _server_without_ranges(body: bytes, cut: int) -> Iterator[str]:
    """Answers every GET with the whole body (200, Range ignored); the first two (yt-dlp's
    first GET only looks at the headers) stop after `cut` bytes and hang up. Slow enough that
    the reader is tailing when the retry comes."""
    gets: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            gets.append(1)
            limit = cut if len(gets) <= 2 else len(body)
            self.send_response(200)
            self.send_header("Content-Type", "audio/mpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                for at in range(0, limit, 8192):
                    self.wfile.write(body[at:min(at + 8192, limit)])
                    time.sleep(0.02)
            self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/talk.mp3"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_retry_that_restarts_voids_the_stream(media: Path, tmp_path: Path) -> None:
    body = (media / "talk.mp3").read_bytes()
    with _server_without_ranges(body, cut=40_000) as url:
        handle = _start(url, tmp_path, retries=2)
        assert handle.file_ready.wait(10)
        path = handle.partial_path
        assert path is not None
        # a cut-off mp3 may or may not decode cleanly
        with AudioStreamContext(path, chunk_seconds=5.0, growing=handle.finished) as s, \
                contextlib.suppress(JobError):
            for _ in s.chunks():
                pass
        final = handle.result(timeout=20)
    assert handle.restarted.is_set() and handle.partial_path is None
    # the reader's file was left as the first attempt wrote it, never rewritten under it
    assert 0 < s.bytes_in <= 40_000
    assert final.read_bytes() == body  # the download itself still completes
    assert list(tmp_path.iterdir()) == [final]


def test_404_fails_the_handle(server: LocalServer, tmp_path: Path) -> None:
    handle = _start(server.url_for("missing.mp3"), tmp_path)
    with pytest.raises(JobError) as info:
        handle.result(timeout=10)
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "404" in info.value.message
    assert handle.finished.is_set() and handle.file_ready.is_set()
    assert handle.partial_path is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("who", ["job", "handle"])
def test_cancel_stops_download_and_decoding(server: LocalServer, tmp_path: Path, who: str) -> None:
    # "job": one event cancels both, as a job's cancel does; "handle": only the download is
    # stopped, and the decoder ends because `finished` is set and the file is read to its end
    server.throttle(30_000)
    job_cancel = threading.Event()
    handle = _start(server.url_for("talk.mp3"), tmp_path, cancel=job_cancel)
    assert handle.file_ready.wait(10)
    path = handle.partial_path
    assert path is not None
    with AudioStreamContext(path, chunk_seconds=1.0, growing=handle.finished,
                            cancel=job_cancel) as s:
        chunks = s.chunks()
        next(chunks)  # decoding is under way on the growing file
        pid = s.pid
        assert pid is not None and psutil.pid_exists(pid)
        began = time.monotonic()
        if who == "job":
            job_cancel.set()
        else:
            handle.cancel()
        ended: JobError | None = None
        try:
            for _ in chunks:
                pass
        except JobError as e:  # job: Cancelled; handle: EOF mid-frame may or may not fail
            ended = e
    assert isinstance(ended, Cancelled) == (who == "job")
    assert handle.finished.wait(1.0)
    assert time.monotonic() - began < 1.0
    assert job_cancel.is_set() == (who == "job")
    assert s.seconds_decoded < 20  # stopped, not decoded to the end of the 33 s
    with pytest.raises(Cancelled):
        handle.result(timeout=0)
    # ffmpeg reaped (other children of this process, e.g. a session's server, are not ours)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert [c for c in psutil.Process().children(recursive=True) if c.name() == "ffmpeg"] == []
    assert list(tmp_path.iterdir()) == []  # no partial file, no early name, no work folder


def test_plain_mp4_waits_for_the_whole_file(
    server: LocalServer, media: Path, tmp_path: Path
) -> None:
    source = (media / "jfk.m4a").read_bytes()
    assert source.index(b"moov") > source.index(b"mdat")  # the index really comes last
    server.throttle(40_000)
    handle = _start(server.url_for("jfk.m4a"), tmp_path)
    assert handle.file_ready.wait(10)
    path = handle.partial_path
    assert path is not None and handle.container_hint == ".m4a"
    assert not handle.finished.is_set()
    assert not can_stream_while_growing(path)  # so the caller decodes the finished file
    final = handle.result(timeout=20)
    assert final == path and final.read_bytes() == source
    assert abs(_samples(final) - 11 * 16000) < 16000


_CHILD = """
import sys
from longscribe.service import fetch
fetch.start_download(sys.argv[1], sys.argv[2], allow_private_networks=True).result()
"""


def test_killed_streaming_download_resumes_under_the_same_name(
    server: LocalServer, media: Path, tmp_path: Path
) -> None:
    """A process killed mid-way leaves its work folder and the early name (a second link to the
    partial file); the next download adopts the folder, drops that stale name and resumes."""
    server.throttle(40_000)
    url = server.url_for("talk.mp3")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(tmp_path)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            early = tmp_path / "download.mp3"
            if early.is_file() and early.stat().st_size >= 40_000:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the child's download never got going")
    finally:
        child.kill()
        child.wait()
    server.throttle(200_000)
    handle = _start(url, tmp_path)
    assert handle.file_ready.wait(10)
    path = handle.partial_path
    assert path == tmp_path / "download.mp3"
    with AudioStreamContext(path, chunk_seconds=5.0, growing=handle.finished) as s:
        streamed = sum(c.num_samples for c in s.chunks())
    final = handle.result(timeout=10)
    assert final == path and not handle.restarted.is_set()
    assert final.read_bytes() == (media / "talk.mp3").read_bytes()
    assert [h.status for h in server.log if h.range] == [206]  # resumed, not restarted
    assert list(tmp_path.iterdir()) == [final]
    assert 0 <= streamed - _samples(final) <= MP3_END_PADDING

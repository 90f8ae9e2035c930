"""Real yt-dlp downloads from a real local HTTP server: progress, retries, errors, limits,
cancellation and SSRF refusals (including redirects and DNS answers)."""

from __future__ import annotations

import fcntl
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import trustme
from longscribe.service import fetch, netguard
from longscribe.service.errors import Cancelled, JobError

from tests.conftest import JFK, ROOT, ffmpeg, require_testdata
from tests.httpserver import LocalServer, serve_directory

FAST = fetch.RetryPolicy(max_total_seconds=20.0, initial_wait=0.05, max_wait=0.2)


def _page(body: str) -> str:
    return f"<!doctype html><html><head><title>Talk</title></head><body>{body}</body></html>"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_testdata()
    folder = tmp_path_factory.mktemp("served")
    ffmpeg("-i", str(JFK), "-ac", "1", "-b:a", "64k", str(folder / "jfk.mp3"))
    (folder / "notes.txt").write_text("these are meeting notes, not audio\n" * 50)
    (folder / "page.html").write_text("<!doctype html><html><body><p>No media.</p></body></html>")
    audio = '<audio controls src="{}"></audio>'
    (folder / "one.html").write_text(_page(audio.format("jfk.mp3")))
    (folder / "two.html").write_text(_page(audio.format("jfk.mp3") + audio.format("jfk.mp3?b")))
    return folder


@pytest.fixture
def server(media: Path) -> Iterator[LocalServer]:
    with serve_directory(media) as s:
        yield s


def _get(url: str, dest: Path, **kw: object) -> Path:
    kw.setdefault("allow_private_networks", True)
    kw.setdefault("retry_policy", FAST)
    return fetch.download(url, dest, **kw)  # type: ignore[arg-type]


def _fails(url: str, dest: Path, **kw: object) -> JobError:
    with pytest.raises(JobError) as info:
        _get(url, dest, **kw)
    assert list(dest.iterdir()) == [] if dest.exists() else True  # nothing left behind
    return info.value


def test_download_succeeds_with_progress(server: LocalServer, media: Path, tmp_path: Path) -> None:
    seen: list[fetch.FetchProgress] = []
    path = _get(server.url_for("jfk.mp3"), tmp_path, on_progress=seen.append, max_bytes=1 << 20)
    source = (media / "jfk.mp3").read_bytes()
    assert path.parent == tmp_path and path.suffix == ".mp3"
    assert path.read_bytes() == source
    assert list(tmp_path.iterdir()) == [path]  # the private temp folder is gone
    done = [p.downloaded_bytes for p in seen]
    assert done == sorted(done) and done[-1] == len(source)
    assert all(p.total_bytes == len(source) for p in seen)
    assert seen[-1].fraction == 1.0


def test_404_is_not_found_without_retries(server: LocalServer, tmp_path: Path) -> None:
    err = _fails(server.url_for("missing.mp3"), tmp_path, retries=3)
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert "HTTP 404 Not Found" in err.message and "missing.mp3" in err.message
    assert server.hits("missing.mp3") == 1


def test_transient_500s_are_retried(server: LocalServer, media: Path, tmp_path: Path) -> None:
    server.fail("jfk.mp3", [500, 500])
    path = _get(server.url_for("jfk.mp3"), tmp_path, retries=3)
    assert path.read_bytes() == (media / "jfk.mp3").read_bytes()
    assert server.hits("jfk.mp3", status=500) == 2
    assert server.hits("jfk.mp3", status=200) >= 1


def test_always_500_gives_up_unavailable(server: LocalServer, tmp_path: Path) -> None:
    server.fail_always("jfk.mp3", 503)
    err = _fails(server.url_for("jfk.mp3"), tmp_path, retries=2)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert "503" in err.message and "3 attempts" in err.message
    assert server.hits("jfk.mp3") == 3


def test_403_is_permission_denied(server: LocalServer, tmp_path: Path) -> None:
    server.fail("jfk.mp3", [403])
    err = _fails(server.url_for("jfk.mp3"), tmp_path)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "403" in err.message
    assert server.hits("jfk.mp3") == 1


@pytest.mark.parametrize("name", ["notes.txt", "page.html"])
def test_text_and_html_are_not_media(server: LocalServer, tmp_path: Path, name: str) -> None:
    err = _fails(server.url_for(name), tmp_path)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert name in err.message


@pytest.mark.parametrize("hide_length", [False, True])
def test_size_limit(server: LocalServer, tmp_path: Path, hide_length: bool) -> None:
    # with a Content-Length the limit trips at once; without one, on the running byte count
    if hide_length:
        server.hide_length("jfk.mp3")
    err = _fails(server.url_for("jfk.mp3"), tmp_path, max_bytes=40_000)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "40,000 bytes" in err.message
    assert ("so far" in err.message) == hide_length


def test_disk_space_is_checked(server: LocalServer, tmp_path: Path) -> None:
    err = _fails(server.url_for("jfk.mp3"), tmp_path, min_free_bytes=1 << 60)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk space" in err.message


def test_page_with_one_embedded_audio(server: LocalServer, media: Path, tmp_path: Path) -> None:
    path = _get(server.url_for("one.html"), tmp_path)
    assert path.read_bytes() == (media / "jfk.mp3").read_bytes()
    assert server.hits("one.html") >= 1 and server.hits("jfk.mp3") >= 1


def test_page_with_several_media_is_a_playlist(server: LocalServer, tmp_path: Path) -> None:
    err = _fails(server.url_for("two.html"), tmp_path)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "playlist (2 items)" in err.message
    assert server.hits("jfk.mp3") == 0  # nothing downloaded


def _cancel_after(server: LocalServer, tmp_path: Path, trigger: str) -> float:
    """Start a throttled download, cancel it, return seconds from cancel to Cancelled."""
    cancel = threading.Event()
    started = threading.Event()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}

    def progress(_: fetch.FetchProgress) -> None:
        started.set()

    cancelled_at: list[float] = []

    def canceller() -> None:
        if trigger == "progress":
            started.wait(10)
        time.sleep(0.5)
        cancelled_at.append(time.monotonic())
        cancel.set()

    thread = threading.Thread(target=canceller)
    thread.start()
    with pytest.raises(Cancelled):
        _get(server.url_for("jfk.mp3"), tmp_path, cancel=cancel, on_progress=progress)
    elapsed = time.monotonic() - cancelled_at[0]
    thread.join()
    children_after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert children_after <= children_before
    assert list(tmp_path.iterdir()) == []
    return elapsed


def test_cancel_during_trickling_download(server: LocalServer, tmp_path: Path) -> None:
    server.throttle(8_000, chunk=1024)  # the 89 kB file would take ~11 s
    assert _cancel_after(server, tmp_path, "progress") < 1.0


def test_cancel_during_stalled_read(server: LocalServer, tmp_path: Path) -> None:
    # one chunk, then ~20 s of silence: no progress hook fires; the socket must be shut down
    server.throttle(200, chunk=4096)
    assert _cancel_after(server, tmp_path, "start") < 1.0


def test_cancel_before_start(server: LocalServer, tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        _get(server.url_for("jfk.mp3"), tmp_path, cancel=cancel)
    assert server.hits() == 0


# -- SSRF ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, code",
    [
        ("http://169.254.169.254/latest/meta-data/", grpc.StatusCode.PERMISSION_DENIED),
        ("http://[::1]/a.mp3", grpc.StatusCode.PERMISSION_DENIED),
        ("file:///etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
        ("ftp://127.0.0.1/a.mp3", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_forbidden_urls(url: str, code: grpc.StatusCode, tmp_path: Path) -> None:
    err = _fails(url, tmp_path, allow_private_networks=False)
    assert err.code == code


def test_loopback_refused_unless_allowed(server: LocalServer, tmp_path: Path) -> None:
    err = _fails(server.url_for("jfk.mp3"), tmp_path, allow_private_networks=False)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "127.0.0.1" in err.message
    assert server.hits() == 0
    assert _get(server.url_for("jfk.mp3"), tmp_path, allow_private_networks=True).is_file()


def test_public_looking_name_resolving_private(server: LocalServer, tmp_path: Path) -> None:
    # the name resolves to this very server: were it not refused, the request would land here
    with netguard.override_resolver({"media.example.com": ["127.0.0.1"]}):
        err = _fails(f"http://media.example.com:{server.port}/jfk.mp3", tmp_path,
                     allow_private_networks=False)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "media.example.com" in err.message
    assert server.hits() == 0
    with netguard.override_resolver({"media.example.com": ["10.0.0.5"]}):
        err = _fails("http://media.example.com/jfk.mp3", tmp_path, allow_private_networks=False)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "10.0.0.5" in err.message


def test_connection_uses_the_checked_address(server: LocalServer, tmp_path: Path) -> None:
    # DNS pinning: the socket goes to the address the guard vetted (a name no real DNS knows)
    allowed = {("127.0.0.1", server.port)}
    with netguard.override_resolver({"pinned.example.com": ["127.0.0.1"]}):
        path = _get(f"http://pinned.example.com:{server.port}/jfk.mp3", tmp_path,
                    allow_private_networks=False, allow_endpoints=allowed)
    assert path.is_file() and server.hits("jfk.mp3") >= 1


def test_redirect_to_private_target_is_refused(
    server: LocalServer, media: Path, tmp_path: Path
) -> None:
    """First hop: this server, let through by an explicit (ip, port) allowlist entry. It
    redirects to a second server on another port, which is private and not allowlisted. The
    second server must never see a request; with private networks allowed the same redirect
    works, so the refusal is the guard's doing, not a broken redirect."""
    with serve_directory(media) as private:
        server.redirect("/go.mp3", private.url_for("jfk.mp3"))
        allowed = {("127.0.0.1", server.port)}
        err = _fails(server.url_for("go.mp3"), tmp_path, allow_private_networks=False,
                     allow_endpoints=allowed)
        assert err.code == grpc.StatusCode.PERMISSION_DENIED
        assert f"port {private.port}" in err.message
        assert server.hits("go.mp3") == 1 and private.hits() == 0

        with netguard.override_resolver({"internal.example.com": ["10.0.0.5"]}):
            server.redirect("/go2.mp3", "http://internal.example.com/secret.mp3")
            err = _fails(server.url_for("go2.mp3"), tmp_path, allow_private_networks=False,
                         allow_endpoints=allowed)
        assert err.code == grpc.StatusCode.PERMISSION_DENIED and "10.0.0.5" in err.message

        ok = _get(server.url_for("go.mp3"), tmp_path, allow_private_networks=True)
        assert ok.read_bytes() == (media / "jfk.mp3").read_bytes()
        assert private.hits("jfk.mp3") >= 1


def test_redirect_to_file_scheme_is_refused(server: LocalServer, tmp_path: Path) -> None:
    server.redirect("/evil.mp3", "file:///etc/passwd")
    err = _fails(server.url_for("evil.mp3"), tmp_path)
    assert err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
    assert not any(p.read_bytes().startswith(b"root:") for p in tmp_path.rglob("*") if p.is_file())


def test_dropped_connection_resumes_with_range(
    server: LocalServer, media: Path, tmp_path: Path
) -> None:
    # bodies stop after 30 kB: a transient failure; the retry asks only for the rest. Two cuts:
    # yt-dlp first GETs the URL to look at its headers (unaffected), then downloads it (cut).
    server.truncate("jfk.mp3", 30_000, times=2)
    path = _get(server.url_for("jfk.mp3"), tmp_path, retries=2)
    assert path.read_bytes() == (media / "jfk.mp3").read_bytes()
    ranges = [h.range for h in server.log if h.path == "/jfk.mp3" and h.status == 206]
    # resumed from what reached the disk (yt-dlp drops the block it was reading), not from 0
    assert ranges and 0 < int(ranges[-1].removeprefix("bytes=").rstrip("-")) <= 30_000


def test_https_uses_the_hostname_for_tls_on_the_pinned_address(
    media: Path, tmp_path: Path
) -> None:
    """The socket goes to the vetted address while TLS still names (SNI) and verifies the host.
    The test CA is not in yt-dlp's trust store, so verification must fail, once, not retried."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("media.example.com").configure_cert(context)
    with serve_directory(media, tls=context) as https:
        url = f"https://media.example.com:{https.port}/jfk.mp3"
        with netguard.override_resolver({"media.example.com": ["127.0.0.1"]}):
            err = _fails(url, tmp_path, allow_private_networks=False,
                         allow_endpoints={("127.0.0.1", https.port)})
        assert err.code == grpc.StatusCode.UNAVAILABLE and "certificate" in err.message.lower()
        assert https.sni_names == ["media.example.com"]  # one handshake: no retries
        assert https.hits() == 0


def test_page_embedding_private_media_is_refused(
    server: LocalServer, media: Path, tmp_path: Path
) -> None:
    # the page is fetched (allowlisted); the media it points at is on a private address
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "embed.html").write_text(_page(f'<audio src="{server.url_for("jfk.mp3")}"></audio>'))
    with serve_directory(pages) as site:
        dest = tmp_path / "dest"
        err = _fails(site.url_for("embed.html"), dest, allow_private_networks=False,
                     allow_endpoints={("127.0.0.1", site.port)})
        assert err.code == grpc.StatusCode.PERMISSION_DENIED
        assert site.hits("embed.html") == 1 and server.hits() == 0


_CHILD = """
import sys
from longscribe.service import fetch
fetch.download(sys.argv[1], sys.argv[2], allow_private_networks=True)
"""


def test_download_killed_mid_way_resumes_in_the_next_call(
    server: LocalServer, media: Path, tmp_path: Path
) -> None:
    """A server killed with SIGKILL mid-download leaves its work folder; the next download of
    the same URL adopts it and asks only for the missing bytes."""
    server.throttle(20_000, chunk=2048)
    url = server.url_for("jfk.mp3")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(tmp_path)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = list(tmp_path.glob(".fetch-*/*.part"))
            if parts and parts[0].stat().st_size >= 20_000:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the child's download never got going")
    finally:
        child.kill()
        child.wait()
    on_disk = parts[0].stat().st_size
    server.throttle(None)
    path = _get(url, tmp_path)
    assert path.read_bytes() == (media / "jfk.mp3").read_bytes()
    ranges = [h.range for h in server.log if h.status == 206]
    assert ranges and int(ranges[-1].removeprefix("bytes=").rstrip("-")) >= on_disk
    assert list(tmp_path.iterdir()) == [path]


def test_a_work_folder_in_use_is_left_alone(server: LocalServer, tmp_path: Path) -> None:
    busy = tmp_path / ".fetch-busy"
    busy.mkdir()
    (busy / "url").write_text(server.url_for("jfk.mp3"))
    (busy / "media.mp3.part").write_bytes(b"someone else's partial download")
    holder = os.open(busy / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = _get(server.url_for("jfk.mp3"), tmp_path)
        assert (busy / "media.mp3.part").is_file()  # not adopted, not deleted
        assert path.parent == tmp_path
        assert not [h for h in server.log if h.status == 206]  # a fresh download
    finally:
        os.close(holder)
    stale = tmp_path / ".fetch-stale"
    stale.mkdir()
    (stale / "url").write_text("http://elsewhere.example/other.mp3")
    _get(server.url_for("jfk.mp3"), tmp_path)
    assert not stale.exists()  # abandoned and for another URL: removed


def test_cancel_during_retry_backoff(server: LocalServer, tmp_path: Path) -> None:
    server.fail_always("jfk.mp3", 500)
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def cancel_once_waiting() -> None:  # the first attempt failed: now in the 30 s backoff
        while server.hits("jfk.mp3") == 0:
            time.sleep(0.01)
        time.sleep(0.3)
        cancelled_at.append(time.monotonic())
        cancel.set()

    thread = threading.Thread(target=cancel_once_waiting)
    thread.start()
    slow = fetch.RetryPolicy(max_total_seconds=60, initial_wait=30, max_wait=30)
    with pytest.raises(Cancelled):
        _get(server.url_for("jfk.mp3"), tmp_path, cancel=cancel, retry_policy=slow)
    assert time.monotonic() - cancelled_at[0] < 1.0
    thread.join()
    assert server.hits("jfk.mp3") == 1 and list(tmp_path.iterdir()) == []


def test_proxy_environment_is_ignored(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a proxy would connect on our behalf, past the address check: it must never be used
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert _get(server.url_for("jfk.mp3"), tmp_path).is_file()


def test_a_failing_progress_callback_does_not_fail_the_download(
    server: LocalServer, tmp_path: Path
) -> None:
    def broken(_: fetch.FetchProgress) -> None:
        raise ZeroDivisionError("display bug")

    assert _get(server.url_for("jfk.mp3"), tmp_path, on_progress=broken).is_file()


def test_unwritable_destination_is_a_clear_error(server: LocalServer, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = _fails(server.url_for("jfk.mp3"), blocker / "sub")
    assert err.code == grpc.StatusCode.INTERNAL and "download folder" in err.message


# -- the source registry ------------------------------------------------------------------------

class _LocalFileSource(fetch.Source):
    """A second source type, as a new module would add one: `localfile:///path` copies a local
    file in 16 kB pieces; its first attempt fails with a transient error."""

    attempts = 0

    @classmethod
    def check(cls, url: str, options: object) -> None:
        if not Path(url.removeprefix("localfile://")).is_file():
            raise JobError(grpc.StatusCode.NOT_FOUND, f"no such file: {url}")

    def attempt(self) -> Path:
        type(self).attempts += 1
        if type(self).attempts == 1:
            raise OSError("the disk blinked")
        source = Path(self.session.url.removeprefix("localfile://"))
        out = self.session.work / f"media{source.suffix}"
        data = source.read_bytes()
        with out.open("wb") as f:
            for start in range(0, len(data), 16_384):
                f.write(data[start:start + 16_384])
                self.session.report(min(start + 16_384, len(data)), len(data), None, None, None)
        return out

    def classify(self, error: BaseException) -> JobError:
        return fetch.Transient(f"reading {self.session.url} failed: {error}")

    def abort(self) -> None:
        pass  # every piece goes through session.report, which sees the stop


@pytest.fixture
def local_source(monkeypatch: pytest.MonkeyPatch) -> type[_LocalFileSource]:
    monkeypatch.setitem(fetch.SOURCES, "localfile", _LocalFileSource)
    monkeypatch.setattr(_LocalFileSource, "attempts", 0)
    return _LocalFileSource


def test_a_registered_source_gets_retries_limits_and_cleanup(
    local_source: type[_LocalFileSource], media: Path, tmp_path: Path
) -> None:
    url = f"localfile://{media / 'jfk.mp3'}"
    seen: list[fetch.FetchProgress] = []
    path = _get(url, tmp_path / "a", retries=1, on_progress=seen.append)
    assert path == tmp_path / "a" / "download.mp3"
    assert path.read_bytes() == (media / "jfk.mp3").read_bytes()
    assert local_source.attempts == 2 and seen[-1].fraction == 1.0
    assert list((tmp_path / "a").iterdir()) == [path]  # its work folder is gone
    err = _fails(url, tmp_path / "b", max_bytes=20_000)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "20,000 bytes" in err.message
    err = _fails("localfile:///no/such.mp3", tmp_path / "c")
    assert err.code == grpc.StatusCode.NOT_FOUND


def test_unregistered_scheme_names_the_ones_served(
    local_source: type[_LocalFileSource], tmp_path: Path
) -> None:
    err = _fails("ftp://127.0.0.1/a.mp3", tmp_path)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "only http://, https:// and localfile:// URLs" in err.message, err.message

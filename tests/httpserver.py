"""A small threaded HTTP server on 127.0.0.1 for tests: serves the files of one folder.

    from tests.httpserver import serve_directory

    with serve_directory(tmp_path) as server:
        url = server.url_for("speech.mp3")      # http://127.0.0.1:PORT/speech.mp3
        server.fail("speech.mp3", [500, 500])   # the next two GETs answer 500, then normal
        server.redirect("/go", "http://...")    # /go answers 302 Location: ...
        server.throttle(64_000)                 # bytes per second for every body from now on
        server.hide_length("speech.mp3")        # no Content-Length: body ends at close
        server.truncate("speech.mp3", 30_000)   # next GET: stop after 30 kB and hang up
        ...
        server.hits("speech.mp3")               # requests seen for that path (any status)
        server.log                              # [Hit(method, path, status, range), ...]

Features: GET and HEAD, single `Range: bytes=a-b` requests (206/416), Content-Type from the file
extension, 404 for missing files, queued failure statuses per path, redirects, bodies without
Content-Length, and throttled bodies (the throttle loop stops when the server stops, so a test
never hangs on a slow body). `serve_directory(root, tls=ssl_context)` serves HTTPS instead and
records the SNI names clients sent in `server.sni_names`.
"""

from __future__ import annotations

import contextlib
import mimetypes
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class Hit:
    method: str
    path: str
    status: int
    range: str | None


class LocalServer:
    """State shared by the request threads; the public methods are the test hooks."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = ""  # set once the socket is bound: "http://127.0.0.1:PORT"
        self.port = 0
        self.log: list[Hit] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._failures: dict[str, list[int]] = {}
        self._redirects: dict[str, tuple[str, int]] = {}
        self._bytes_per_second: float | None = None
        self._chunk = 16 * 1024
        self._hide_length: set[str] = set()
        self._truncate: dict[str, list[int]] = {}
        self.sni_names: list[str | None] = []

    # -- hooks -------------------------------------------------------------------------------
    def url_for(self, path: str) -> str:
        return f"{self.url}/{path.lstrip('/')}"

    def fail(self, path: str, statuses: Iterable[int]) -> None:
        """Answer the next requests for `path` with these statuses, in order, then serve."""
        with self._lock:
            self._failures.setdefault(_norm(path), []).extend(statuses)

    def fail_always(self, path: str, status: int = 500) -> None:
        self.fail(path, [status] * 10_000)

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        with self._lock:
            self._redirects[_norm(path)] = (location, status)

    def throttle(self, bytes_per_second: float | None, chunk: int = 4096) -> None:
        """Send bodies at about this rate, in `chunk`-byte writes (None: full speed)."""
        with self._lock:
            self._bytes_per_second = bytes_per_second
            self._chunk = chunk if bytes_per_second else 16 * 1024

    def hide_length(self, path: str) -> None:
        """Serve `path` without Content-Length (body ends when the connection closes)."""
        with self._lock:
            self._hide_length.add(_norm(path))

    def truncate(self, path: str, after_bytes: int, times: int = 1) -> None:
        """The next `times` bodies of `path` stop after `after_bytes` and the connection closes
        (a dropped download; the Content-Length still promises the whole body)."""
        with self._lock:
            self._truncate.setdefault(_norm(path), []).extend([after_bytes] * times)

    def hits(self, path: str | None = None, status: int | None = None) -> int:
        wanted = None if path is None else _norm(path)
        with self._lock:
            return sum(
                1
                for h in self.log
                if (wanted is None or h.path == wanted) and (status is None or h.status == status)
            )

    # -- used by the handler -------------------------------------------------------------------
    def _record(self, hit: Hit) -> None:
        with self._lock:
            self.log.append(hit)

    def _next_failure(self, path: str) -> int | None:
        with self._lock:
            queue = self._failures.get(path)
            return queue.pop(0) if queue else None

    def _redirect_for(self, path: str) -> tuple[str, int] | None:
        with self._lock:
            return self._redirects.get(path)

    def _next_truncation(self, path: str) -> int | None:
        with self._lock:
            queue = self._truncate.get(path)
            return queue.pop(0) if queue else None

    def _length_hidden(self, path: str) -> bool:
        with self._lock:
            return path in self._hide_length

    def _pace(self) -> tuple[float | None, int]:
        with self._lock:
            return self._bytes_per_second, self._chunk


def _norm(path: str) -> str:
    return "/" + unquote(urlsplit(path).path).lstrip("/")


def _make_handler(state: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _simple(self, path: str, status: int, headers: dict[str, str] | None = None) -> None:
            state._record(Hit(self.command, path, status, self.headers.get("Range")))
            payload = f"{status} {HTTPStatus(status).phrase}\n".encode()
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _serve(self, body: bool) -> None:
            path = _norm(self.path)
            failure = state._next_failure(path)
            if failure is not None:
                return self._simple(path, failure)
            redirect = state._redirect_for(path)
            if redirect is not None:
                return self._simple(path, redirect[1], {"Location": redirect[0]})
            file = (state.root / path.lstrip("/")).resolve()
            if not file.is_relative_to(state.root) or not file.is_file():
                return self._simple(path, 404)
            size = file.stat().st_size
            start, end, status = 0, size - 1, 200
            wanted = self.headers.get("Range")
            if wanted:
                match = _RANGE.match(wanted.strip())
                if match and (match[1] or match[2]):
                    if match[1]:
                        start = int(match[1])
                        end = min(int(match[2]), size - 1) if match[2] else size - 1
                    else:  # suffix range: the last N bytes
                        start = max(size - int(match[2]), 0)
                    if start >= size or start > end:
                        return self._simple(path, 416, {"Content-Range": f"bytes */{size}"})
                    status = 206
            state._record(Hit(self.command, path, status, wanted))
            self.send_response(status)
            ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            self.send_header("Content-Type", ctype)
            self.send_header("Accept-Ranges", "bytes")
            if state._length_hidden(path) and status == 200:
                self.close_connection = True
                self.send_header("Connection", "close")
            else:
                self.send_header("Content-Length", str(end - start + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                cut = state._next_truncation(path)
                self._send_body(file, start, end - start + 1, cut)

        def _send_body(self, file: Path, start: int, length: int, cut: int | None) -> None:
            rate, chunk = state._pace()
            began = time.monotonic()
            sent = 0
            with file.open("rb") as f, contextlib.suppress(ConnectionError, TimeoutError):
                f.seek(start)
                while sent < length and not state.stopping.is_set():
                    want = min(chunk, length - sent)
                    if cut is not None:
                        want = min(want, cut - sent)
                    data = f.read(want)
                    if not data:
                        break
                    self.wfile.write(data)
                    sent += len(data)
                    if rate:
                        ahead = sent / rate - (time.monotonic() - began)
                        if ahead > 0 and state.stopping.wait(ahead):
                            break
                    if cut is not None and sent >= cut:
                        break
            if sent < length:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    tls: ssl.SSLContext | None = None

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-body (cancel tests) are expected, not news

    def finish_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if self.tls is None:
            return super().finish_request(request, client_address)
        # the TLS handshake runs here, in the request's thread, not in the accept loop
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


@contextlib.contextmanager
def serve_directory(
    root: Path | str, *, tls: ssl.SSLContext | None = None
) -> Iterator[LocalServer]:
    """Serve `root` on 127.0.0.1 (a free port) while inside; stops and joins on exit.
    With `tls` (a server-side SSLContext), serve HTTPS."""
    state = LocalServer(Path(root))
    httpd = _Server(("127.0.0.1", 0), _make_handler(state))
    if tls is not None:
        tls.sni_callback = lambda _sock, name, _ctx: state.sni_names.append(name)
        httpd.tls = tls
    state.port = httpd.server_address[1]
    state.url = f"{'https' if tls else 'http'}://127.0.0.1:{state.port}"
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="test-http", daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

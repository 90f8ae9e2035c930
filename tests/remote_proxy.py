"""A fault-injecting HTTP proxy for the remote engine's tests, in front of a real
faster-whisper-server: it forwards every request unchanged, and on command answers 401 to a
wrong key, 429 with Retry-After, 500, or delays an answer. Every request is logged with its
arrival and end times, what it asked for, and whether the client hung up before the answer."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Logged:
    arrived: float  # time.monotonic()
    path: str
    words: bool  # asked for word timestamps
    temperature: str | None  # the temperature field, when sent
    status: int = 0
    ended: float = 0.0
    client_gone_at: float | None = None  # the client closed its connection before the answer


class FaultProxy:
    """`FaultProxy(upstream_port).start()`; `stop()` closes the port (connections refused)."""

    def __init__(self, upstream_port: int, port: int = 0, api_key: str = "") -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.api_key = api_key  # requests must carry "Bearer <api_key>" when set
        self.faults: deque[tuple[int, float]] = deque()  # (status, retry_after) for next requests
        self.delay = 0.0  # seconds added before forwarding
        self.delay_count = 0  # delay only this many more requests (0: every one while delay)
        self.log: list[Logged] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy.lock:
                    proxy._connections.add(self.connection)

            def finish(self) -> None:
                with proxy.lock:
                    proxy._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                proxy._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the port and every open connection: the remote is gone."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> list[Logged]:
        with self.lock:
            return list(self.log)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        temperature = None
        marker = b'name="temperature"\r\n\r\n'
        if marker in body:
            temperature = body.split(marker, 1)[1].split(b"\r\n", 1)[0].decode()
        entry = Logged(time.monotonic(), h.path, b'name="timestamp_granularities[]"' in body
                       and b"\r\n\r\nword\r\n" in body, temperature)
        with self.lock:
            self.log.append(entry)
            fault = self.faults.popleft() if self.faults else None
            delay = self.delay
            if delay and self.delay_count:
                self.delay_count -= 1
                if not self.delay_count:
                    self.delay = 0.0
        if self.api_key and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            self._answer(h, entry, 401, {"error": {"message": "Incorrect API key provided",
                                                   "type": "invalid_request_error"}})
            return
        if fault is not None:
            status, retry_after = fault
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after else {}
            self._answer(h, entry, status, {"error": {"message": f"injected {status}"}}, headers)
            return
        if delay and not self._wait(h, entry, delay):
            return
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
            conn.request("POST", h.path, body, {"Content-Type": h.headers["Content-Type"]})
            reply = conn.getresponse()
            data = reply.read()
            conn.close()
        except OSError:
            self._answer(h, entry, 502, {"error": {"message": "upstream unreachable"}})
            return
        self._answer_raw(h, entry, reply.status, data, reply.getheader("Content-Type") or "")

    def _wait(self, h: BaseHTTPRequestHandler, entry: Logged, seconds: float) -> bool:
        """Sleep `seconds`, watching for the client to hang up; False if it did."""
        deadline = time.monotonic() + seconds
        sock = h.connection
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], min(left, 0.05))
            if readable:
                try:
                    gone = sock.recv(1, 2) == b""  # MSG_PEEK: EOF means the client closed
                except OSError:
                    gone = True
                if gone:
                    entry.client_gone_at = time.monotonic()
                    entry.ended = entry.client_gone_at
                    h.close_connection = True
                    return False
        return True

    def _answer(self, h: BaseHTTPRequestHandler, entry: Logged, status: int,
                payload: dict[str, object], headers: dict[str, str] | None = None) -> None:
        self._answer_raw(h, entry, status, json.dumps(payload).encode(), "application/json",
                         headers)

    def _answer_raw(self, h: BaseHTTPRequestHandler, entry: Logged, status: int, data: bytes,
                    content_type: str, headers: dict[str, str] | None = None) -> None:
        entry.status = status
        entry.ended = time.monotonic()
        try:
            h.send_response(status)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            entry.client_gone_at = entry.client_gone_at or time.monotonic()

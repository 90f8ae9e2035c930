"""yt-dlp's HTTP layer, SSRF-checked.

yt-dlp's request handlers are replaced by one (`GuardedRH`) whose sockets are opened by
`Guard.open`: every connection (first request, every redirect hop, every fragment) resolves its
host through `netguard.resolve_checked` and connects to a vetted address (DNS pinned). No proxy
is ever used (one would connect on the target's behalf, past the check). `Guard.abort` shuts the
open sockets down, so a read blocked on a silent server returns at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref
from typing import Any

import grpc
import urllib3
from longscribe.service import netguard
from longscribe.service.errors import JobError
from longscribe.service.fetch.session import Session
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from yt_dlp import YoutubeDL
from yt_dlp.networking._requests import RequestsRH
from yt_dlp.networking.exceptions import HTTPError
from yt_dlp.utils import parse_http_range


class Guard:
    """One download's address policy and open sockets."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.pool_classes = _guarded_pool_classes(self)

    def open(self, conn: urllib3.connection.HTTPConnection) -> socket.socket:
        """Open the socket for `conn` to a vetted address of its host (pinned: no re-resolve)."""
        if self.session.stop.is_set():
            raise NewConnectionError(conn, "the download was cancelled")
        options = self.session.options
        try:
            addresses = netguard.resolve_checked(
                getattr(conn, "_dns_host", conn.host), conn.port, options.allow_private_networks,
                options.allow_endpoints,
            )
        except JobError as e:
            if e.code != grpc.StatusCode.UNAVAILABLE:  # a DNS hiccup stays retryable
                self.session.fail(e)
            raise NewConnectionError(conn, e.message) from None
        last: OSError | None = None
        for address in addresses:
            try:
                sock = urllib3.util.connection.create_connection(
                    (address, conn.port),
                    conn.timeout,
                    source_address=conn.source_address,
                    socket_options=conn.socket_options,
                )
            except TimeoutError as e:
                raise ConnectTimeoutError(conn, f"connecting to {conn.host} timed out") from e
            except OSError as e:
                last = e
                continue
            with self._lock:
                self._sockets.add(sock)
            return sock
        raise NewConnectionError(conn, f"could not connect to {conn.host}: {last}")

    def abort(self) -> None:
        """Shut every open socket down so a blocked read returns now."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def resume_refused(self) -> None:
        """A Range resume was refused: yt-dlp is about to rewrite its file from byte 0."""
        if self.session.on_restart is not None:
            self.session.on_restart("the server refused to resume")


def _guarded_pool_classes(guard: Guard) -> dict[str, type]:
    class Conn(urllib3.connection.HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return guard.open(self)

    class TLSConn(urllib3.connection.HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return guard.open(self)

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = Conn

    class TLSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = TLSConn

    return {"http": Pool, "https": TLSPool}


class GuardedRH(RequestsRH):
    """yt-dlp's requests handler with our socket factory and no proxies at all."""

    guard: Guard  # set right after yt-dlp builds the handler

    def _create_instance(self, cookiejar: Any, legacy_ssl_support: Any = None) -> Any:
        session = super()._create_instance(cookiejar, legacy_ssl_support)
        for adapter in session.adapters.values():
            adapter.poolmanager.pool_classes_by_scheme = self.guard.pool_classes
        return session

    def _get_proxies(self, request: Any) -> dict[str, str]:
        return {}  # a proxy would connect on the target's behalf, past the address check

    def _send(self, request: Any) -> Any:
        # yt-dlp keeps appending only when a "Range: bytes=N-" (N > 0) gets a 206 starting at N;
        # anything else (200, 416, another start) makes it rewrite its file from byte 0.
        start = parse_http_range(request.headers.get("Range"))[0]
        try:
            response = super()._send(request)
        except HTTPError as e:
            if start and e.status == 416:
                self.guard.resume_refused()
            raise
        if start and (response.status != 206 or parse_http_range(
                response.headers.get("Content-Range"))[0] != start):
            self.guard.resume_refused()
        return response


class GuardedYoutubeDL(YoutubeDL):
    """YoutubeDL whose only request handler is GuardedRH (no urllib, websockets, curl_cffi)."""

    def __init__(self, params: dict[str, Any], guard: Guard) -> None:
        self._guard = guard
        super().__init__(params)

    def build_request_director(self, handlers: Any, preferences: Any = None) -> Any:
        director = super().build_request_director([GuardedRH], None)
        for handler in director.handlers.values():
            handler.guard = self._guard
        return director

"""HTTP to a server speaking the OpenAI audio API: one multipart POST per window, errors sorted
into the classes the engine retries differently, and requests another thread can cut off.

requests (urllib3 underneath) is the client: it is already installed with the server (through
openai-whisper's tiktoken), blocking calls suit our worker threads, and its pools reuse
connections. A blocking read cannot be interrupted, so each worker thread's connections
register themselves with the call running on that thread (`Call`), and `Call.abort()` shuts
their sockets down: the read returns at once and the remote sees the connection close.
"""

from __future__ import annotations

import contextlib
import email.utils
import io
import json
import socket
import threading
import time
import wave
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .transcriber import SAMPLE_RATE

MAX_RETRY_AFTER = 600.0  # a Retry-After past this is taken as this


class RemoteError(Exception):
    """A request that got no usable answer."""


class Transient(RemoteError):
    """5xx, a timeout, a refused or broken connection: worth retrying, counts for the circuit."""


class RateLimited(RemoteError):
    """429: the remote is up, our key is over its limit; `retry_after` in seconds when given."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Rejected(RemoteError):
    """Another 4xx: retrying cannot help (a bad key, an unknown model, a refused file)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Aborted(RemoteError):
    """The call was cut off by `Call.abort()` (its job was cancelled)."""


class Call:
    """One request's connections, so another thread can cut it off."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: list[HTTPConnection] = []
        self.aborted = False

    def attach(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connections.append(connection)
            if self.aborted:
                _shut(connection)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            for connection in self._connections:
                _shut(connection)

    def finish(self) -> None:
        """The answer is in: its connection goes back to the pool, maybe to another job's
        request, which a late abort of this call must not cut off."""
        with self._lock:
            self._connections.clear()


def _shut(connection: HTTPConnection) -> None:
    sock = getattr(connection, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)


_current = threading.local()  # the Call running on this thread


class _Tracked:
    """Mixed into urllib3's connections: attach to the current Call on every request (a
    kept-alive connection is not connected again) and on connect."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._attach()

    def request(self, *args: Any, **kwargs: Any) -> Any:
        self._attach()
        return super().request(*args, **kwargs)  # type: ignore[misc]

    def _attach(self) -> None:
        call = getattr(_current, "call", None)
        if call is not None:
            call.attach(self)  # type: ignore[arg-type]


class _TrackedHTTPConnection(_Tracked, HTTPConnection):
    pass


class _TrackedHTTPSConnection(_Tracked, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _SPool(HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


_POOLS = {"http": _Pool, "https": _SPool}


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if hasattr(manager, "pool_classes_by_scheme"):
            manager.pool_classes_by_scheme = _POOLS
        return manager


def display_url(url: str) -> str:
    """The URL without credentials, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def wav_bytes(samples: np.ndarray) -> bytes:
    """16 kHz mono 16-bit PCM WAV: every server reads it, no encoder process needed."""
    pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def _error_text(response: requests.Response) -> str:
    """The remote's own message: OpenAI's {"error": {"message"}}, FastAPI's {"detail": ...}."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(body, dict):
        for candidate in (body.get("error"), (body.get("detail") or {}) if isinstance(
                body.get("detail"), dict) else None):
            if isinstance(candidate, dict):
                candidate = candidate.get("error", candidate)
                if isinstance(candidate, dict) and candidate.get("message"):
                    return str(candidate["message"])[:200]
        if isinstance(body.get("detail"), str):
            return body["detail"][:200]
    return json.dumps(body)[:200]


@dataclass(frozen=True)
class RemoteRequest:
    """What one window asks the remote for."""

    audio: bytes  # WAV
    language: str | None = None
    prompt: str | None = None
    translate: bool = False
    words: bool = True  # ask for word timestamps
    temperature: float | None = None  # None: the remote's own (whisper's fallback)


class RemoteClient:
    """POST {base_url}/audio/transcriptions (or /audio/translations), verbose_json."""

    def __init__(self, base_url: str, model: str, api_key: str = "", timeout: float = 120.0,
                 model_field: str = "model", connect_timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_field = model_field
        self.timeout = (min(connect_timeout, timeout), timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._local = threading.local()  # one Session per worker thread

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            for prefix in ("http://", "https://"):
                session.mount(prefix, _Adapter(pool_connections=1, pool_maxsize=1))
        return session

    def transcribe(self, request: RemoteRequest, call: Call) -> dict[str, Any]:
        """The remote's verbose_json answer; raises Transient, RateLimited, Rejected, Aborted."""
        endpoint = "translations" if request.translate else "transcriptions"
        fields: list[tuple[str, str]] = [(self.model_field, self.model),
                                         ("response_format", "verbose_json")]
        if request.language and not request.translate:
            fields.append(("language", request.language))
        if request.prompt:
            fields.append(("prompt", request.prompt))
        if request.temperature is not None:
            fields.append(("temperature", str(request.temperature)))
        if request.words:
            fields += [("timestamp_granularities[]", "segment"),
                       ("timestamp_granularities[]", "word")]
        _current.call = call
        try:
            if call.aborted:
                raise Aborted("cancelled")
            response = self._session().post(
                f"{self.base_url}/audio/{endpoint}", data=fields, headers=self._headers,
                files={"file": ("window.wav", request.audio, "audio/wav")},
                timeout=self.timeout)
            body = response.content  # read it all while the call is still ours to abort
        except requests.exceptions.Timeout as exc:
            raise Aborted("cancelled") if call.aborted else Transient("timed out") from exc
        except requests.exceptions.RequestException as exc:
            if call.aborted:
                raise Aborted("cancelled") from exc
            raise Transient(_connection_reason(exc)) from exc
        finally:
            _current.call = None
            call.finish()
        status = response.status_code
        if status == 200:
            try:
                answer = json.loads(body)
            except ValueError as exc:
                raise Transient("answered 200 with a body that is not JSON") from exc
            if not isinstance(answer, dict):
                raise Transient("answered 200 with JSON that is not an object")
            return answer
        message = _error_text(response)
        if status == 429:
            raise RateLimited(f"HTTP 429 {message}".strip(),
                              retry_after_seconds(response.headers.get("Retry-After")))
        if status >= 500 or status in (408, 409, 425):
            raise Transient(f"HTTP {status} {message}".strip())
        raise Rejected(status, message)


def _connection_reason(exc: BaseException) -> str:
    text = str(exc)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("Connection reset", "connection reset"),
                           ("RemoteDisconnected", "connection closed by the remote"),
                           ("Name or service not known", "host not found"),
                           ("nodename nor servname", "host not found")):
        if needle in text:
            return reason
    return f"connection failed ({type(exc).__name__})"

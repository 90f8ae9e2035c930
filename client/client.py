"""A small Python client for the longscribe gRPC API.

    with LongscribeClient("127.0.0.1:50051") as client:
        result = client.transcribe("talk.mp3")          # uploads, then watches to the end
        print(result.formats.srt)

Only grpcio and protobuf are needed: nothing here imports the server packages."""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
from longscribe import __version__
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc

from .errors import LongscribeError

log = logging.getLogger("longscribe.client")

DEFAULT_PORT = 50051
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"


def with_default_port(target: str) -> str:
    """'host' → 'host:50051' (gRPC would otherwise dial 443); targets with a port or a scheme
    (unix:, dns:///…) are left as they are."""
    if "://" in target or target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return target
    if target.startswith("["):  # [v6] or [v6]:port
        return target if "]:" in target else f"{target}:{DEFAULT_PORT}"
    colons = target.count(":")
    if colons == 1:
        return target
    return f"[{target}]:{DEFAULT_PORT}" if colons > 1 else f"{target}:{DEFAULT_PORT}"
SERVICE_NAME = "longscribe.v1.TranscriptionService"
MiB = 1 << 20

TERMINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})
# A watch stream that fails with one of these is re-opened from the next event index.
RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})

EventCallback = Callable[[pb.JobEvent], None]
ProgressCallback = Callable[[int, int], None]


def make_options(
    language: str | None = None, task: str | None = None, initial_prompt: str | None = None
) -> pb.TranscriptionOptions:
    """TranscriptionOptions with only the given fields set (empty means the server default)."""
    return pb.TranscriptionOptions(
        language=language or "", task=task or "", initial_prompt=initial_prompt or ""
    )


def is_terminal(event: pb.JobEvent) -> bool:
    """A job's last event carries its result or its error."""
    return event.WhichOneof("event") in ("result", "error")


def state_value(state: int | str) -> int:
    """A JobState from its number or its name ("queued", "QUEUED" or "JOB_STATE_QUEUED")."""
    if isinstance(state, int):
        return state
    name = state.strip().upper()
    if not name.startswith("JOB_STATE_"):
        name = "JOB_STATE_" + name
    try:
        return pb.JobState.Value(name)
    except ValueError:
        raise ValueError(f"unknown job state {state!r}") from None


def state_name(state: int) -> str:
    """The short name people read: SUCCEEDED for JOB_STATE_SUCCEEDED."""
    try:
        return pb.JobState.Name(state).removeprefix("JOB_STATE_")
    except ValueError:
        return str(state)


def _retry_service_config(attempts: int) -> str:
    # gRPC's own retries for the unary calls: they are safe to repeat (SubmitJob is idempotent
    # by request_id, which submit_* always sends). Streams are resumed by watch() instead.
    methods = ["SubmitJob", "GetJob", "ListJobs", "CancelJob"]
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE_NAME, "method": m} for m in methods],
                    "retryPolicy": {
                        "maxAttempts": max(2, attempts),
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def _read_pem(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read TLS {what} {path!r}: {exc.strerror or exc}") from None


class LongscribeClient:
    """A connection to a longscribe server. Use as a context manager, or call close().

    `timeout` (seconds) is the deadline of the short calls (submit, get, list, cancel); uploads
    and watches run as long as the job needs. A bearer `token` is sent as `authorization`
    metadata on every call. TLS is on when `tls_ca`, `tls_cert` or `tls=True` is given
    (`tls=True` alone trusts the system roots)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls: bool | None = None,
        tls_server_name: str | None = None,
        timeout: float | None = None,
        reconnect_attempts: int = 8,
        reconnect_backoff: float = 0.5,
        max_backoff: float = 10.0,
    ) -> None:
        self.target = with_default_port(target)
        self.timeout = timeout
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_backoff = reconnect_backoff
        self.max_backoff = max_backoff
        # Metadata rather than call credentials: grpc refuses call credentials on an
        # insecure channel, and a token behind a TLS-terminating proxy is a real setup.
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", 16 * MiB),
            # A long transcript's result (text + srt + vtt + json) can run to tens of MiB.
            ("grpc.max_receive_message_length", 256 * MiB),
            # Keepalive pings only while a call is open, so a watch behind a NAT or proxy that
            # drops idle connections is noticed; 60 s stays above common server minimums.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _retry_service_config(4)),
            ("grpc.primary_user_agent", f"longscribe-client/{__version__}"),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_cert and not tls_key or tls_key and not tls_cert:
            raise ValueError("a TLS client certificate needs both tls_cert and tls_key")
        use_tls = tls if tls is not None else bool(tls_ca or tls_cert)
        self.tls = use_tls
        if use_tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(tls_ca, "CA bundle"),
                private_key=_read_pem(tls_key, "client key"),
                certificate_chain=_read_pem(tls_cert, "client certificate"),
            )
            self._channel = grpc.secure_channel(self.target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=options)
        self._stub = pb_grpc.TranscriptionServiceStub(self._channel)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LongscribeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_until_ready(self, timeout: float) -> None:
        """Block until the server accepts connections (a server that is still starting), or
        raise LongscribeError(UNAVAILABLE) after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise LongscribeError(
                grpc.StatusCode.UNAVAILABLE,
                f"no server answered at {self.target} within {timeout:g} s",
            ) from None

    # -- submitting ------------------------------------------------------------------------

    def _unary(self, method: Callable[..., object], request: object) -> object:
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as err:
            raise LongscribeError.from_rpc(err, tls=self.tls) from err

    def submit_url(
        self,
        url: str,
        *,
        options: pb.TranscriptionOptions | None = None,
        request_id: str | None = None,
    ) -> pb.Job:
        """Start a job for an http(s) URL (anything yt-dlp can fetch)."""
        request = pb.SubmitJobRequest(
            url=url, options=options, request_id=request_id or uuid.uuid4().hex
        )
        return self._unary(self._stub.SubmitJob, request)  # type: ignore[return-value]

    def submit_path(
        self,
        server_path: str,
        *,
        options: pb.TranscriptionOptions | None = None,
        request_id: str | None = None,
    ) -> pb.Job:
        """Start a job for a file under the server's media root (a path relative to it)."""
        request = pb.SubmitJobRequest(
            server_path=server_path, options=options, request_id=request_id or uuid.uuid4().hex
        )
        return self._unary(self._stub.SubmitJob, request)  # type: ignore[return-value]

    def upload(
        self,
        path: str | Path,
        *,
        options: pb.TranscriptionOptions | None = None,
        request_id: str | None = None,
        chunk_size: int = MiB,
        on_progress: ProgressCallback | None = None,
    ) -> pb.Job:
        """Upload a local file and start a job for it. The file is read from disk one chunk at
        a time. `on_progress(bytes_sent, bytes_total)` runs on gRPC's sending thread."""
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise LongscribeError(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot read {str(path)!r}: {exc.strerror}"
            ) from exc
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        metadata = pb.UploadMetadata(
            filename=path.name,
            options=options,
            request_id=request_id or uuid.uuid4().hex,
            size_bytes=size,
        )

        def requests() -> Iterator[pb.UploadRequest]:
            yield pb.UploadRequest(metadata=metadata)
            sent = 0
            with path.open("rb") as fh:
                while chunk := fh.read(chunk_size):
                    yield pb.UploadRequest(chunk=chunk)
                    sent += len(chunk)
                    if on_progress is not None:
                        on_progress(sent, size)

        try:
            return self._stub.UploadAndSubmit(requests(), metadata=self._metadata)
        except grpc.RpcError as err:
            raise LongscribeError.from_rpc(err, tls=self.tls) from err

    def submit(
        self,
        source: str | Path,
        *,
        options: pb.TranscriptionOptions | None = None,
        request_id: str | None = None,
        server_path: bool = False,
        on_upload: ProgressCallback | None = None,
    ) -> pb.Job:
        """Start a job for `source`: an existing local file is uploaded, an http(s) URL is
        submitted, and with server_path=True it names a file under the server's media root."""
        text = str(source)
        if server_path:
            return self.submit_path(text, options=options, request_id=request_id)
        if Path(text).is_file():
            return self.upload(text, options=options, request_id=request_id, on_progress=on_upload)
        if text.lower().startswith(("http://", "https://")):
            return self.submit_url(text, options=options, request_id=request_id)
        raise LongscribeError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{text!r} is neither an existing local file nor an http(s) URL",
        )

    # -- following a job -------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        delay = min(self.max_backoff, self.reconnect_backoff * 2 ** (failures - 1))
        return delay * random.uniform(0.5, 1.0)  # jitter: many clients don't return in step

    def watch(
        self, job_id: str, from_index: int = 0, *, reconnect: bool = True
    ) -> Iterator[pb.JobEvent]:
        """A job's events from `from_index`, each exactly once and in order, until its terminal
        event (a result or an error). A dropped stream (UNAVAILABLE, or closed before the end)
        is re-opened from the last seen index + 1, up to `reconnect_attempts` times in a row
        with exponential backoff; an error that is not worth retrying raises LongscribeError."""
        next_index = from_index
        failures = 0
        while True:
            call = self._stub.WatchJob(
                pb.WatchJobRequest(job_id=job_id, from_index=next_index),
                metadata=self._metadata,
            )
            try:
                for event in call:
                    if event.index < next_index:
                        continue  # a replay overlap: the caller has seen it
                    next_index = event.index + 1
                    failures = 0
                    yield event
                    if is_terminal(event):
                        return
                # The server closed the stream without a terminal event. If the job is over,
                # its last event lies before from_index and there is nothing more to send.
                job = self.get(job_id)
                if job.state in TERMINAL_STATES and next_index >= job.event_count:
                    return
                reason = LongscribeError(
                    grpc.StatusCode.UNAVAILABLE,
                    "the event stream ended before the job did",
                    job_id=job_id,
                )
            except grpc.RpcError as err:
                reason = LongscribeError.from_rpc(err, job_id=job_id, tls=self.tls)
            except LongscribeError as err:  # from get(): the server may be going away too
                reason = err
            finally:
                call.cancel()  # no-op when the stream is done; frees it when the caller stops
            if not reconnect or reason.code not in RECONNECT_CODES:
                raise reason
            failures += 1
            if failures > self.reconnect_attempts:
                raise reason
            delay = self._backoff(failures)
            log.warning(
                "lost the event stream of job %s (%s: %s); reconnecting from event %d in "
                "%.1f s (attempt %d of %d)",
                job_id,
                reason.code_name,
                reason.message,
                next_index,
                delay,
                failures,
                self.reconnect_attempts,
            )
            time.sleep(delay)

    def wait(
        self, job_id: str, *, from_index: int = 0, on_event: EventCallback | None = None
    ) -> pb.Result:
        """Watch a job to its end: its Result, or LongscribeError for a FAILED/CANCELLED job."""
        for event in self.watch(job_id, from_index):
            if on_event is not None:
                on_event(event)
            kind = event.WhichOneof("event")
            if kind == "result":
                return event.result
            if kind == "error":
                raise LongscribeError.from_event(event.error, job_id=job_id)
        # The terminal event lay before from_index: ask for the outcome instead.
        job = self.get(job_id, include_result=True)
        if job.state == pb.JOB_STATE_SUCCEEDED:
            return job.result
        raise LongscribeError.from_event(job.error, job_id=job_id)

    def transcribe(
        self,
        source: str | Path,
        *,
        options: pb.TranscriptionOptions | None = None,
        request_id: str | None = None,
        server_path: bool = False,
        on_event: EventCallback | None = None,
        on_upload: ProgressCallback | None = None,
        on_job: Callable[[pb.Job], None] | None = None,
    ) -> pb.Result:
        """Submit `source` (see submit()) and wait for its Result. `on_job` gets the Job as
        soon as it exists (to cancel it on Ctrl-C, say); `on_event` gets every event."""
        job = self.submit(
            source,
            options=options,
            request_id=request_id,
            server_path=server_path,
            on_upload=on_upload,
        )
        if on_job is not None:
            on_job(job)
        return self.wait(job.job_id, on_event=on_event)

    # -- other calls -----------------------------------------------------------------------

    def get(self, job_id: str, include_result: bool = False) -> pb.Job:
        request = pb.GetJobRequest(job_id=job_id, include_result=include_result)
        return self._unary(self._stub.GetJob, request)  # type: ignore[return-value]

    def cancel(self, job_id: str) -> pb.Job:
        """Ask the server to stop a job; it becomes CANCELLED once the work has stopped."""
        request = pb.CancelJobRequest(job_id=job_id)
        return self._unary(self._stub.CancelJob, request)  # type: ignore[return-value]

    # Defined last: inside the class body `list` names this method from here on.
    def list(
        self, states: Iterable[int | str] | None = None, page_size: int = 0
    ) -> Iterator[pb.Job]:
        """Every job (newest first, as the server orders them), following page tokens."""
        wanted = [state_value(s) for s in states or ()]
        token = ""
        while True:
            request = pb.ListJobsRequest(page_size=page_size, page_token=token, states=wanted)
            page: pb.ListJobsResponse = self._unary(self._stub.ListJobs, request)  # type: ignore
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

"""The gRPC servicer: a thin layer that validates requests, calls the job manager, and turns
JobError into a gRPC status. No transcription logic lives here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from longscribe.service import metrics
from longscribe.service.auth import client_identity
from longscribe.service.errors import JobError, bounded, exhausted, invalid
from longscribe.service.jobs import JobManager, Source
from longscribe.service.live.rpc import transcribe_live
from longscribe.service.netguard import check_url
from longscribe.service.paths import resolve_media_path
from longscribe.service.uploads import UploadWriter
from longscribe.service.watch import job_events
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

log = logging.getLogger(__name__)

MAX_REQUEST_ID = 200
MAX_PROMPT_CHARS = 2000
MAX_URL_CHARS = 4096
MAX_JOB_ID_CHARS = 128

T = TypeVar("T")


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a call that may block (SQLite, disk, DNS) off the event loop."""
    return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))


@contextlib.asynccontextmanager
async def rpc_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """JobError → its status; anything else → INTERNAL with the reason (never a bare UNKNOWN)."""
    try:
        yield
    except JobError as exc:
        await context.abort(exc.code, bounded(exc.message))
    except (grpc.aio.AbortError, asyncio.CancelledError):
        raise  # the status is set already, or the client went away
    except grpc.RpcError:
        # reading a client stream failed in gRPC itself (the client cancelled, or a message over
        # the receive limit): the call already has its status; not a server error
        log.info("client stream ended by gRPC", exc_info=False)
        raise
    except Exception as exc:
        log.exception("internal error in RPC")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")


def validate_options(options: pb.TranscriptionOptions) -> None:
    if options.task not in ("", "transcribe", "translate"):
        raise invalid(f"task must be 'transcribe' or 'translate', not {options.task!r}")
    language = options.language.lower()
    if language and language not in LANGUAGES and language not in TO_LANGUAGE_CODE:
        raise invalid(f"unknown language {options.language[:40]!r}; use an ISO 639-1 code "
                      "like 'en'")
    if len(options.initial_prompt) > MAX_PROMPT_CHARS:
        raise invalid(f"initial_prompt is longer than {MAX_PROMPT_CHARS} characters")


def _validate_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID:
        raise invalid(f"request_id is longer than {MAX_REQUEST_ID} characters")


def _validate_job_id(job_id: str) -> None:
    if not job_id:
        raise invalid("job_id is required")
    if len(job_id) > MAX_JOB_ID_CHARS:
        raise invalid(f"job_id is longer than {MAX_JOB_ID_CHARS} characters")


class TranscriptionServicer(pb_grpc.TranscriptionServiceServicer):
    """Every handler is a coroutine on the server's event loop: streams and uploads wait without
    holding a thread; anything that may block runs in a worker thread (`blocking`)."""

    def __init__(self, manager: JobManager, config: Any, tokens: frozenset[str] = frozenset()
                 ) -> None:
        self.manager = manager
        self.config = config
        self.tokens = tokens

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        return client_identity(context, tokens=self.tokens)

    def _owner(self, context: grpc.aio.ServicerContext) -> str | None:
        """With tokens configured, each token sees and controls only the jobs it submitted;
        without, every client sees every job (there is no identity to scope by)."""
        return self._client(context) if self.tokens else None

    # --- submitting -------------------------------------------------------------------------

    def _source(self, request: pb.SubmitJobRequest) -> Source:
        kind = request.WhichOneof("source")
        if kind == "url":
            url = request.url.strip()
            if not url or len(url) > MAX_URL_CHARS:
                raise invalid("url must be a non-empty http(s) URL")
            check_url(url, self.config.allow_private_networks)
            return Source("url", url)
        if kind == "server_path":
            path = resolve_media_path(self.config.media_root, request.server_path)
            return Source("path", request.server_path, str(path))
        raise invalid("set a source: url or server_path (or use UploadAndSubmit for a file)")

    def _submit(self, request: pb.SubmitJobRequest, client: str) -> pb.Job:
        """Blocking: resolves the URL's host and writes the job row."""
        _validate_request_id(request.request_id)
        which = request.WhichOneof("source")
        asked = Source("url" if which == "url" else "path",
                       request.url if which == "url" else request.server_path)
        existing = self.manager.existing_for_request(request.request_id, client, asked,
                                                     request.options)
        if existing is not None:
            return existing
        validate_options(request.options)
        source = self._source(request)
        return self.manager.submit(source, request.options, request_id=request.request_id,
                                   client=client)

    async def SubmitJob(self, request: pb.SubmitJobRequest,
                        context: grpc.aio.ServicerContext) -> pb.Job:
        async with rpc_errors(context):
            return await blocking(self._submit, request, self._client(context))

    async def UploadAndSubmit(self, request_iterator: AsyncIterator[pb.UploadRequest],
                              context: grpc.aio.ServicerContext) -> pb.Job:
        async with rpc_errors(context):
            return await self._upload(aiter(request_iterator), self._client(context))

    async def _next_message(self, messages: AsyncIterator[pb.UploadRequest]
                            ) -> pb.UploadRequest | None:
        """The next upload message, None at the end; a client silent for longer than
        upload_idle_timeout ends the upload (a stalled upload would hold its slot forever)."""
        timeout = self.config.upload_idle_timeout
        try:
            return await asyncio.wait_for(anext(messages, None), timeout=timeout or None)
        except asyncio.TimeoutError:
            raise JobError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the upload sent nothing for {timeout:g} s (upload_idle_timeout) and was "
                "ended; nothing was kept: send the file again",
            ) from None

    async def _upload(self, messages: AsyncIterator[pb.UploadRequest], client: str) -> pb.Job:
        first = await self._next_message(messages)
        if first is None or not first.HasField("metadata"):
            raise invalid("the first UploadRequest must carry metadata (filename, options)")
        meta = first.metadata
        _validate_request_id(meta.request_id)
        existing = await blocking(self.manager.existing_for_request, meta.request_id, client,
                                  Source("upload", meta.filename), meta.options)
        if existing is not None:
            return existing
        validate_options(meta.options)
        await blocking(self.manager.check_admission, client)
        await blocking(self._check_upload_size, meta.size_bytes)
        job_id = self.manager.new_job_id()
        job_dir = self.manager.job_dir(job_id)
        try:
            with UploadWriter(job_dir, meta.filename or "upload", self.config.max_upload_bytes,
                              min_free_bytes=self.config.min_free_disk_bytes) as writer:
                while (message := await self._next_message(messages)) is not None:
                    if message.HasField("metadata"):
                        raise invalid("metadata may only be sent once, in the first message")
                    await blocking(writer.write, message.chunk)
                    metrics.add_audio_bytes(len(message.chunk))
            return await blocking(
                self.manager.submit, Source("upload", writer.path.name, str(writer.path)),
                meta.options, request_id=meta.request_id, client=client, job_id=job_id)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise

    def _check_upload_size(self, size: int) -> None:
        if size < 0:
            raise invalid("size_bytes must not be negative")
        if size > self.config.max_upload_bytes:
            raise exhausted(
                f"the upload is {size} bytes, over this server's limit of "
                f"{self.config.max_upload_bytes} bytes (max_upload_bytes)"
            )
        free = shutil.disk_usage(self.config.data_dir).free
        if size and free - size < self.config.min_free_disk_bytes:
            raise exhausted(
                f"not enough disk space on the server for a {size}-byte upload "
                f"({free} bytes free, {self.config.min_free_disk_bytes} kept in reserve)"
            )

    # --- watching ---------------------------------------------------------------------------

    async def WatchJob(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.JobEvent]:
        async with rpc_errors(context):
            _validate_job_id(request.job_id)
            async for event in job_events(self.manager, request.job_id, request.from_index,
                                          self._owner(context)):
                yield event

    async def Transcribe(self, request: pb.TranscribeRequest, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.JobEvent]:
        async with rpc_errors(context):
            job = await blocking(self._submit, request.job, self._client(context))
            if request.cancel_on_disconnect:
                # Runs when the RPC ends for any reason; a finished job ignores the cancel.
                context.add_done_callback(lambda _: self._cancel_quietly(job.job_id))
            async for event in job_events(self.manager, job.job_id, 0):
                yield event

    def _cancel_quietly(self, job_id: str) -> None:
        with contextlib.suppress(JobError):
            self.manager.cancel(job_id)

    # --- reading and cancelling -------------------------------------------------------------

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext
                     ) -> pb.Job:
        async with rpc_errors(context):
            _validate_job_id(request.job_id)
            return await blocking(self.manager.get, request.job_id, request.include_result,
                                  self._owner(context))

    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
                       ) -> pb.ListJobsResponse:
        async with rpc_errors(context):
            for state in request.states:
                if state not in pb.JobState.values():
                    raise invalid(f"unknown job state {state}")
            jobs, token = await blocking(self.manager.list, request.states, request.page_size,
                                         request.page_token, self._owner(context))
            return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    # --- live audio (service/live/rpc.py) ----------------------------------------------------

    live: Any = None  # the LiveRuntime, set by the server once the model is loaded

    async def TranscribeLive(self, request_iterator: AsyncIterator[pb.LiveRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.LiveEvent]:
        async for event in transcribe_live(request_iterator, context, self.live,
                                           client=self._client(context),
                                           owner=self._owner(context)):
            yield event

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext
                        ) -> pb.Job:
        async with rpc_errors(context):
            _validate_job_id(request.job_id)
            return await blocking(self.manager.cancel, request.job_id, self._owner(context))

"""The gRPC servicer: a thin layer that validates requests, calls the job manager, and turns
JobError into a gRPC status. No transcription logic lives here."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from typing import Any

import grpc
from longscribe.service import metrics
from longscribe.service.auth import client_identity
from longscribe.service.errors import JobError, bounded, exhausted, invalid
from longscribe.service.jobs import JobManager, Source
from longscribe.service.netguard import check_url
from longscribe.service.paths import resolve_media_path
from longscribe.service.uploads import UploadWriter
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

log = logging.getLogger(__name__)

MAX_REQUEST_ID = 200
MAX_PROMPT_CHARS = 2000
MAX_URL_CHARS = 4096
MAX_JOB_ID_CHARS = 128


@contextlib.contextmanager
def rpc_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """JobError → its status; anything else → INTERNAL with the reason (never a bare UNKNOWN)."""
    try:
        yield
    except JobError as exc:
        context.abort(exc.code, bounded(exc.message))
    except grpc.RpcError:
        # reading a client stream failed in gRPC itself (the client cancelled, or a message over
        # the receive limit): the call already has its status; not a server error
        log.info("client stream ended by gRPC", exc_info=False)
        raise
    except Exception as exc:
        if context.code() not in (None, grpc.StatusCode.OK):
            raise  # context.abort ran below us (e.g. a malformed upload message): keep its status
        log.exception("internal error in RPC")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")


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
    def __init__(self, manager: JobManager, config: Any, tokens: frozenset[str] = frozenset()
                 ) -> None:
        self.manager = manager
        self.config = config
        self.tokens = tokens

    def _client(self, context: grpc.ServicerContext) -> str:
        return client_identity(context, tokens=self.tokens)

    def _owner(self, context: grpc.ServicerContext) -> str | None:
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

    def _submit(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> pb.Job:
        _validate_request_id(request.request_id)
        which = request.WhichOneof("source")
        asked = Source("url" if which == "url" else "path",
                       request.url if which == "url" else request.server_path)
        existing = self.manager.existing_for_request(request.request_id, self._client(context),
                                                     asked, request.options)
        if existing is not None:
            return existing
        validate_options(request.options)
        source = self._source(request)
        return self.manager.submit(source, request.options, request_id=request.request_id,
                                   client=self._client(context))

    def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> pb.Job:
        with rpc_errors(context):
            return self._submit(request, context)

    def UploadAndSubmit(self, request_iterator: Iterator[pb.UploadRequest],
                        context: grpc.ServicerContext) -> pb.Job:
        with rpc_errors(context):
            first = next(request_iterator, None)
            if first is None or not first.HasField("metadata"):
                raise invalid("the first UploadRequest must carry metadata (filename, options)")
            meta = first.metadata
            _validate_request_id(meta.request_id)
            existing = self.manager.existing_for_request(
                meta.request_id, self._client(context), Source("upload", meta.filename),
                meta.options)
            if existing is not None:
                return existing
            validate_options(meta.options)
            client = self._client(context)
            self.manager.check_admission(client)
            self._check_upload_size(meta.size_bytes)
            job_id = self.manager.new_job_id()
            job_dir = self.manager.job_dir(job_id)
            try:
                with UploadWriter(job_dir, meta.filename or "upload", self.config.max_upload_bytes,
                                  min_free_bytes=self.config.min_free_disk_bytes) as writer:
                    for message in request_iterator:
                        if message.HasField("metadata"):
                            raise invalid("metadata may only be sent once, in the first message")
                        writer.write(message.chunk)
                        metrics.add_audio_bytes(len(message.chunk))
                return self.manager.submit(
                    Source("upload", writer.path.name, str(writer.path)), meta.options,
                    request_id=meta.request_id, client=client, job_id=job_id,
                )
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

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext
                 ) -> Iterator[pb.JobEvent]:
        with rpc_errors(context):
            _validate_job_id(request.job_id)
            yield from self.manager.watch(request.job_id, request.from_index, context.is_active,
                                          self._owner(context))

    def Transcribe(self, request: pb.TranscribeRequest, context: grpc.ServicerContext
                   ) -> Iterator[pb.JobEvent]:
        with rpc_errors(context):
            job = self._submit(request.job, context)
            if request.cancel_on_disconnect:
                # Runs when the RPC ends for any reason; a finished job ignores the cancel.
                context.add_callback(lambda: self._cancel_quietly(job.job_id))
            yield from self.manager.watch(job.job_id, 0, context.is_active)

    def _cancel_quietly(self, job_id: str) -> None:
        with contextlib.suppress(JobError):
            self.manager.cancel(job_id)

    # --- reading and cancelling -------------------------------------------------------------

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        with rpc_errors(context):
            _validate_job_id(request.job_id)
            return self.manager.get(request.job_id, request.include_result, self._owner(context))

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext
                 ) -> pb.ListJobsResponse:
        with rpc_errors(context):
            for state in request.states:
                if state not in pb.JobState.values():
                    raise invalid(f"unknown job state {state}")
            jobs, token = self.manager.list(request.states, request.page_size,
                                            request.page_token, self._owner(context))
            return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        with rpc_errors(context):
            _validate_job_id(request.job_id)
            return self.manager.cancel(request.job_id, self._owner(context))

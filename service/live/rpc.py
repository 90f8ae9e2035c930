"""TranscribeLive on the asyncio gRPC server: reads the request stream, hands frames to the
session, writes its events back. Holds no thread per stream: the handler is a coroutine; what
blocks (opening the session's job, the "block" overflow policy, draining at the end) runs in
worker threads through asyncio.to_thread, and the session's threads hand events to the loop
with call_soon_threadsafe.

How a stream ends:
- the client closes its side: every queued frame is transcribed, the finals are sent, then
  `end`; the session's job SUCCEEDS with the transcript.
- bad input (frames before config, an unknown source, a bad frame...) or an engine failure:
  the session is torn down and its job FAILS; the stream ends with that status.
- the client vanishes: what it sent is still transcribed (finals stored in the job), the
  session's memory freed, and its timelines kept `live_resume_seconds` for a client that comes
  back with LiveConfig.session_id; after that its job is finalised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from longscribe.v1 import transcription_pb2 as pb

from ..errors import JobError, bounded, invalid
from .frames import check_config
from .runtime import LiveRuntime
from .session import LiveSession

log = logging.getLogger(__name__)

FINISH_TIMEOUT = 300.0  # seconds to transcribe what is queued when a stream ends
BLOCK_POLL = 0.02  # seconds between tries to queue a frame under the "block" policy
CANCEL_GRACE = 0.25  # seconds between the end of the request stream and the end of the session


@dataclass(frozen=True)
class _Failed:
    error: JobError


_DONE = object()


async def transcribe_live(request_iterator: AsyncIterator[pb.LiveRequest], context: Any,
                          runtime: LiveRuntime | None, *, client: str = "",
                          owner: str | None = None) -> AsyncIterator[pb.LiveEvent]:
    """The TranscribeLive handler body: `async for event in transcribe_live(...): yield event`.
    `client`: who is calling (the job's owner); `owner`: scope for resuming (None: anyone)."""
    if runtime is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            "the model is still loading; retry when health says SERVING")
        return
    try:
        first = await _next(request_iterator)
        if first is None or not first.HasField("config"):
            raise invalid("the first LiveRequest must carry config (sources, sample_rate, "
                          "encoding, options); no audio may come before it")
        cfg = first.config
        settings = check_config(list(cfg.sources), cfg.sample_rate, cfg.encoding, cfg.overflow,
                                cfg.no_partials, cfg.session_id)
        from ..api import validate_options  # the same checks as every job's options

        validate_options(cfg.options)
    except JobError as exc:
        await context.abort(exc.code, bounded(exc.message))
        return
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[Any] = asyncio.Queue()

    def emit(event: pb.LiveEvent | _Failed) -> None:  # from any thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            loop.call_soon_threadsafe(out.put_nowait, event)

    try:
        session = await asyncio.to_thread(runtime.open, settings, cfg.options, emit, client,
                                          owner)
    except JobError as exc:
        await context.abort(exc.code, bounded(exc.message))
        return
    session.on_fail = lambda error: emit(_Failed(error))
    reader = asyncio.create_task(_read(request_iterator, session, runtime, out))
    finished = False
    try:
        while True:
            item = await out.get()
            if item is _DONE:
                finished = True
                return
            if isinstance(item, _Failed):
                finished = True
                reader.cancel()
                await asyncio.to_thread(runtime.end, session, detach=False, error=item.error)
                await context.abort(item.error.code, bounded(item.error.message))
                return
            yield item
    finally:
        if not finished:
            # the client vanished (the call was cancelled): transcribe and store what it
            # sent, free the session, keep it resumable; never on the loop
            reader.cancel()
            threading.Thread(target=_drain_and_detach, args=(runtime, session),
                             name="live-detach", daemon=True).start()


async def _next(request_iterator: AsyncIterator[pb.LiveRequest]) -> pb.LiveRequest | None:
    try:
        return await request_iterator.__anext__()
    except StopAsyncIteration:
        return None


async def _read(request_iterator: AsyncIterator[pb.LiveRequest], session: LiveSession,
                runtime: LiveRuntime, out: asyncio.Queue[Any]) -> None:
    """Frames into the session until the client closes its side; then the end."""
    try:
        async for request in request_iterator:
            kind = request.WhichOneof("payload")
            if kind == "config":
                raise invalid("config may only be sent once, in the first LiveRequest")
            if kind != "audio":
                raise invalid("a LiveRequest must carry config or audio")
            if session.error is not None:
                return  # the session failed; the handler is ending the stream
            src, samples = session.prepare(request.audio.source, request.audio.data)
            # "block": no room, no reading: gRPC's flow control slows the client (polled, so
            # no thread waits per blocked stream)
            while not session.offer(src, samples, timeout=0):
                await asyncio.sleep(BLOCK_POLL)
        done = await asyncio.to_thread(session.finish, FINISH_TIMEOUT)
        if session.error is not None:
            return  # on_fail has told the handler
        # A client's cancel also ends the request stream, and the handler learns of it a moment
        # later (it is cancelled, and cancels this task): wait that moment before ending the
        # session for good, so a client that vanished is detached (resumable) instead.
        await asyncio.sleep(CANCEL_GRACE)
        if not done:
            raise JobError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"the session's audio was not transcribed within {FINISH_TIMEOUT:.0f} s "
                           "of the end of the stream")
        end = session.end_event()
        await asyncio.to_thread(runtime.end, session, detach=False)
        out.put_nowait(end)
        out.put_nowait(_DONE)
    except JobError as exc:
        session.fail(exc)  # -> on_fail -> the handler ends the stream with this status
    except asyncio.CancelledError:
        raise
    except grpc.RpcError:
        pass  # reading failed inside gRPC (the client went away): the handler sees it too
    except Exception as exc:  # noqa: BLE001 - a bug ends the stream with a status
        log.exception("live session %s: reading the stream failed", session.session_id)
        session.fail(JobError(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}"))


def _drain_and_detach(runtime: LiveRuntime, session: LiveSession) -> None:
    try:
        if session.error is None:
            session.finish(FINISH_TIMEOUT)
    except Exception:  # noqa: BLE001
        log.exception("live session %s: draining after a disconnect failed", session.session_id)
    runtime.end(session, detach=session.error is None, error=session.error)

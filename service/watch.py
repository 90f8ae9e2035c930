"""A job's events as an async stream for the gRPC layer: the logged events first, then new ones
as the worker publishes them. A watcher is a coroutine waiting on an asyncio.Queue, so a
thousand idle watchers cost no threads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from longscribe.service.jobs import WATCH_SHUTDOWN, JobManager
from longscribe.v1 import transcription_pb2 as pb


class LoopSink:
    """An EventSink that hands events from worker threads to one event loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> None:
        # RuntimeError: the loop has closed, the server is stopping and nobody is listening
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)


async def job_events(manager: JobManager, job_id: str, from_index: int,
                     owner: str | None = None) -> AsyncIterator[pb.JobEvent]:
    """Events from `from_index` until the job ends. Raises the manager's JobError (NOT_FOUND,
    INVALID_ARGUMENT, UNAVAILABLE at shutdown)."""
    sink = LoopSink(asyncio.get_running_loop())
    subscription = await asyncio.to_thread(manager.subscribe, job_id, from_index, sink, owner)
    try:
        start = from_index
        while start < subscription.replay_until:
            page = await asyncio.to_thread(manager.read_events, job_id, start,
                                           subscription.replay_until)
            if not page:
                break
            for event in page:
                yield event
            start = page[-1].index + 1
        if subscription.finished:
            return
        while True:
            event = await sink.queue.get()
            if event is WATCH_SHUTDOWN:
                raise manager.shutting_down_error(job_id)
            if event.index >= from_index:
                yield event
            if event.HasField("result") or event.HasField("error"):
                return  # the job ended, even if its last event lies before from_index
    finally:
        manager.unsubscribe(subscription)

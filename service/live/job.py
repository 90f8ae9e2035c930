"""A live session is a job: its finals are the job's windows and segment events (so WatchJob,
GetJob and the formats work, and a reconnecting client finds them), and its end is the job's
result. `ManagerJobs` does that through the job manager's live-session hooks."""

from __future__ import annotations

import threading
from typing import Any, Protocol

import grpc
from longscribe.v1 import transcription_pb2 as pb

from .. import formats
from ..errors import JobError
from ..store import TERMINAL_STATES, JobStore, StoredWindow


class LiveJobs(Protocol):
    def open(self, sources: tuple[str, ...], options: pb.TranscriptionOptions, client: str
             ) -> str: ...

    def check_resumable(self, session_id: str, client: str | None) -> int:
        """The number of windows the job has stored; NOT_FOUND / FAILED_PRECONDITION."""
        ...

    def record(self, session_id: str, index: int, final: pb.LiveFinal) -> None: ...

    def finish(self, session_id: str, duration: float, error: JobError | None) -> None: ...


def stored_result(store: JobStore, job_id: str, language: str = "en",
                  duration: float | None = None) -> pb.Result:
    """The job's result from its stored finals: every source's segments in time order."""
    windows = sorted(store.load_windows(job_id).values(), key=lambda w: (w.start, w.index))
    segments: list[pb.Segment] = []
    for window in windows:
        for seg in window.segments:
            message = pb.Segment()
            message.CopyFrom(seg)
            message.id = len(segments)
            segments.append(message)
    segments.sort(key=lambda s: (s.start, s.id))
    for i, seg in enumerate(segments):
        seg.id = i
    text = " ".join(t for t in (s.text.strip() for s in segments) if t)
    if duration is None:
        duration = max((w.end for w in windows), default=0.0)
    return pb.Result(text=text, segments=segments, language=language, duration_seconds=duration,
                     formats=formats.all_formats(text, segments, language))


class ManagerJobs:
    """LiveJobs over service/jobs.py's JobManager."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self._lock = threading.Lock()

    def open(self, sources: tuple[str, ...], options: pb.TranscriptionOptions, client: str
             ) -> str:
        from ..jobs import Source

        job = self.manager.open_live(Source("live", ",".join(sources)), options, client=client)
        return str(job.job_id)

    def check_resumable(self, session_id: str, client: str | None) -> int:
        job = self.manager.get(session_id, owner=client)  # NOT_FOUND for another's
        if not job.source.startswith("live:"):
            raise JobError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"job {session_id[:100]!r} is not a live session")
        if job.state in TERMINAL_STATES:
            raise JobError(grpc.StatusCode.FAILED_PRECONDITION, (
                f"live session {session_id[:100]!r} has ended "
                f"({pb.JobState.Name(job.state).removeprefix('JOB_STATE_')}); its transcript "
                "is in the job (GetJob); start a new session"))
        return len(self.manager.store.load_windows(session_id))

    def record(self, session_id: str, index: int, final: pb.LiveFinal) -> None:
        self.manager.live_window(session_id, StoredWindow(
            index, final.start, final.end, list(final.segments)))

    def finish(self, session_id: str, duration: float, error: JobError | None) -> None:
        result = None
        if error is None:
            row = self.manager.get(session_id)
            result = stored_result(self.manager.store, session_id,
                                   row.options.language or "en", duration)
        self.manager.finish_live(session_id, result, error)

"""What a server holds for live audio: the engine, two small thread pools shared by every
session (pumps: VAD and endpointing; decoders: calls into the engine), the open sessions, and
the detached ones (stream broken off, waiting `resume_seconds` to be resumed before their job
is finalised)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from longscribe.v1 import transcription_pb2 as pb

from .. import metrics
from ..errors import JobError, exhausted
from ..pipeline import decode_options
from ..transcriber import SAMPLE_RATE
from .frames import LiveSettings
from .job import LiveJobs
from .session import LiveLimits, LiveSession

log = logging.getLogger(__name__)

ATTACH_WAIT = 10.0  # a resume waits this long for the broken-off stream's session to detach


@dataclass
class _Detached:
    client: str | None
    positions: dict[str, int]
    next_utterance: dict[str, int]
    deadline: float


class LiveRuntime:
    def __init__(self, engine: Any, *, limits: LiveLimits = LiveLimits(),
                 jobs: LiveJobs | None = None, max_sessions: int = 64,
                 resume_seconds: float = 30.0, pump_threads: int = 2,
                 decode_threads: int = 8) -> None:
        self.engine = engine
        self.limits = limits
        self.jobs = jobs
        self.max_sessions = max_sessions
        self.resume_seconds = resume_seconds
        self.pumps = ThreadPoolExecutor(pump_threads, thread_name_prefix="live-pump")
        # decoders mostly wait on the engine; enough of them that one session's final never
        # waits behind another session's partial for a thread
        self.decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="live-decode")
        self._cond = threading.Condition()
        self._sessions: dict[str, LiveSession] = {}
        self._detached: dict[str, _Detached] = {}
        self._stopping = False
        self._reaper: threading.Thread | None = None

    @classmethod
    def from_config(cls, engine: Any, config: Any, jobs: LiveJobs | None) -> LiveRuntime:
        return cls(engine, limits=LiveLimits.from_config(config), jobs=jobs,
                   max_sessions=config.live_max_sessions,
                   resume_seconds=config.live_resume_seconds)

    @property
    def open_sessions(self) -> int:
        with self._cond:
            return len(self._sessions)

    def open(self, settings: LiveSettings, options: pb.TranscriptionOptions,
             emit: Callable[[pb.LiveEvent], None], client: str = "",
             owner: str | None = None) -> LiveSession:
        """A new session, or the resumed one named by settings.session_id. Blocking (the
        store). Sends the `started` event."""
        if self._stopping:
            raise JobError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        decode = decode_options(options, self.engine.is_multilingual)
        with self._cond:
            if len(self._sessions) >= self.max_sessions:
                raise exhausted(f"this server has {len(self._sessions)} live sessions open, its "
                                f"limit (live_max_sessions); retry later")
        detached = None
        windows = 0
        session_id = settings.session_id
        if session_id:
            windows = self.jobs.check_resumable(session_id, owner) if self.jobs else 0
            detached = self._take_detached(session_id)
        elif self.jobs is not None:
            session_id = self.jobs.open(settings.sources, options, client)
        else:
            import uuid

            session_id = uuid.uuid4().hex
        counter = _Counter(windows)
        sink = None
        if self.jobs is not None:
            jobs, sid = self.jobs, session_id

            def sink(final: pb.LiveFinal) -> None:
                jobs.record(sid, counter.next(), final)

        session = LiveSession(
            self.engine, settings, decode, emit, pumps=self.pumps, decoders=self.decoders,
            limits=self.limits, sink=sink, session_id=session_id,
            positions=detached.positions if detached else None,
            next_utterance=detached.next_utterance if detached else None)
        with self._cond:
            self._sessions[session_id] = session
        metrics.live_session_opened()
        emit(pb.LiveEvent(started=pb.LiveStarted(
            session_id=session_id, resumed=detached is not None,
            source_seconds={n: p / SAMPLE_RATE for n, p in session.positions().items()})))
        log.info("live session %s %s: sources %s", session_id,
                 "resumed" if detached else "opened", ", ".join(settings.sources))
        return session

    def _take_detached(self, session_id: str) -> _Detached:
        """The broken-off session's state; waits a little for a stream whose break the server
        has not noticed yet (the client reconnects quicker than gRPC reports the break)."""
        deadline = time.monotonic() + ATTACH_WAIT
        with self._cond:
            while session_id in self._sessions and time.monotonic() < deadline:
                self._cond.wait(0.1)
            if session_id in self._sessions:
                raise JobError(grpc.StatusCode.FAILED_PRECONDITION, (
                    f"live session {session_id[:100]!r} is still open on another stream; "
                    "close that one first"))
            detached = self._detached.pop(session_id, None)
        if detached is None:
            # known to the store but not detached here (e.g. after a restart): start its
            # timelines afresh in the same job
            detached = _Detached(None, {}, {}, 0.0)
        return detached

    def end(self, session: LiveSession, *, detach: bool, error: JobError | None = None) -> None:
        """The stream is over: free the session. `detach` (the client vanished): keep its
        timelines `resume_seconds` for a resume, then finalise its job. Otherwise finalise its
        job now (FAILED with `error`). Blocking (the store)."""
        session.close()
        session.wait_quiet()
        duration = max(session.positions().values(), default=0) / SAMPLE_RATE
        with self._cond:
            if self._sessions.get(session.session_id) is not session:
                return  # already ended (a stream's end and its cancel both got here)
            del self._sessions[session.session_id]
            if detach and error is None and not self._stopping:
                self._detached[session.session_id] = _Detached(
                    None, session.positions(), session.next_utterances(),
                    time.monotonic() + self.resume_seconds)
                self._start_reaper()
            self._cond.notify_all()
        metrics.live_session_closed()
        if detach and error is None and not self._stopping:
            log.info("live session %s detached; resumable for %.0f s", session.session_id,
                     self.resume_seconds)
            return
        self._finish_job(session.session_id, duration, error)

    def _finish_job(self, session_id: str, duration: float, error: JobError | None) -> None:
        if self.jobs is None:
            return
        try:
            self.jobs.finish(session_id, duration, error)
        except JobError as exc:
            log.warning("live session %s: finishing its job failed: %s", session_id, exc)
        log.info("live session %s ended%s", session_id,
                 f": {error.code.name} {error.message}" if error else "")

    def _start_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap, name="live-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Finalise detached sessions nobody resumed; exits when there are none left."""
        while True:
            with self._cond:
                if not self._detached:
                    self._reaper = None
                    return
                now = time.monotonic()
                due = [(sid, d) for sid, d in self._detached.items() if d.deadline <= now]
                for sid, _ in due:
                    del self._detached[sid]
            for sid, d in due:
                duration = max(d.positions.values(), default=0) / SAMPLE_RATE
                self._finish_job(sid, duration, None)
            time.sleep(0.2)

    def stop(self) -> None:
        """Server shutdown: end every session (their jobs are finalised), then the pools."""
        self._stopping = True
        with self._cond:
            sessions = list(self._sessions.values())
            detached = dict(self._detached)
            self._detached.clear()
        for session in sessions:
            session.fail(JobError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"))
        for sid, d in detached.items():
            self._finish_job(sid, max(d.positions.values(), default=0) / SAMPLE_RATE, None)
        self.pumps.shutdown(wait=False, cancel_futures=True)
        self.decoders.shutdown(wait=False, cancel_futures=True)


class _Counter:
    def __init__(self, start: int) -> None:
        self._next = start
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            value = self._next
            self._next += 1
            return value

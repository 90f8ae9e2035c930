"""The job manager: job state, the worker pool, and the event fan-out to watchers.

A job runs on one worker thread: fetch → decode → segment → engine → results. Every state
change, progress step and segment becomes an event appended to the job's durable log (SQLite)
and handed to each watcher's sink (`EventSink.put`, called from worker threads; the gRPC layer's
sinks forward to its event loop, so a watcher holds no thread). Finished windows are stored as
they finish, so a restarted server resumes a job at the first unfinished window."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from longscribe.service import memory, metrics
from longscribe.service.errors import (
    Cancelled,
    JobError,
    exhausted,
    invalid,
    redact_paths,
)
from longscribe.service.job_files import JobFiles
from longscribe.service.job_messages import error_message, job_message, timestamp
from longscribe.service.job_progress import ProgressGate
from longscribe.service.pipeline import JobContext, check_model_options, run_pipeline
from longscribe.service.store import TERMINAL_STATES, JobRow, JobStore, StoredWindow
from longscribe.v1 import transcription_pb2 as pb

log = logging.getLogger(__name__)

# Handed to every watcher when the server stops: the job resumes after a restart.
WATCH_SHUTDOWN = object()
EVENT_PAGE = 256  # events read from the log per call when a watcher catches up


class EventSink(Protocol):
    def put(self, item: Any) -> None:
        """Called from worker threads with each new event, then WATCH_SHUTDOWN at shutdown.
        Must not block."""


@dataclass(frozen=True)
class Subscription:
    job_id: str
    sink: EventSink
    replay_until: int  # events before this index come from the log, later ones to the sink
    finished: bool  # the job had ended: nothing will come to the sink


@dataclass
class _Job:
    row: JobRow
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    subscribers: list[EventSink] = field(default_factory=list)
    progress: ProgressGate = field(default_factory=ProgressGate)
    started_at: float | None = None  # monotonic start of the current run


@dataclass(frozen=True)
class Source:
    kind: str  # "url" | "path" | "upload"
    value: str  # URL, path under the media root, or upload file name
    media_path: str = ""  # known already for path and upload sources


def _same_request(row: JobRow, source: Source, options: pb.TranscriptionOptions) -> bool:
    """Whether a request repeats the one that created `row` (an upload is stored under a fresh
    file name, so uploads compare by kind and options only)."""
    same_source = row.source_kind == source.kind and (
        source.kind == "upload" or row.source == source.value)
    return same_source and row.options.SerializeToString(deterministic=True) == \
        options.SerializeToString(deterministic=True)


class JobManager:
    def __init__(self, config: Any, store: JobStore, runner: Callable[[JobContext], pb.Result]
                 = run_pipeline) -> None:
        self.config = config
        self.store = store
        self._runner = runner
        self._lock = threading.RLock()
        self._jobs: dict[str, _Job] = {}
        self._by_request: dict[str, str] = {}
        self._pending: queue.Queue[str | None] = queue.Queue()
        # Ids in _pending or running: a job id is queued at most once, so no two workers run
        # the same job (a duplicate would decode it twice and log segments after its result).
        self._queued: set[str] = set()
        self._workers: list[threading.Thread] = []
        self._closing = False
        self._engine: Any = None
        self.files = JobFiles(config.data_dir)
        # Unfinished jobs found in the store, resumed by start(); jobs submitted while the
        # model loads are queued by submit() itself and must not be queued again there.
        self._resume: list[str] = []
        for row in store.load_jobs():
            if row.state in TERMINAL_STATES:
                row.result = None  # loaded on demand: results can be large
            else:
                self._resume.append(row.job_id)
            percent = row.progress.percent if row.progress else 0.0
            self._jobs[row.job_id] = _Job(row=row, progress=ProgressGate(max_percent=percent))
            if row.request_id:
                self._by_request[self._request_key(row.client, row.request_id)] = row.job_id
        self.files.remove_leftovers(keep=self._holds_files)
        self._janitor = threading.Thread(target=self._janitor_loop, name="janitor", daemon=True)
        self._janitor_stop = threading.Event()
        self._publish_state_counts()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, engine: Any) -> None:
        """Start workers once the engine (and so the model) is ready; resume the unfinished
        jobs of the previous run (those submitted since are in the queue already)."""
        self._engine = engine
        with self._lock:
            unfinished = sorted(
                (j for j in (self._jobs.get(i) for i in self._resume)
                 if j is not None and j.row.state not in TERMINAL_STATES),
                key=lambda j: j.row.seq,
            )
            self._resume = []
        for job in unfinished:
            log.info("resuming job %s (was %s)", job.row.job_id, pb.JobState.Name(job.row.state))
            self._enqueue(job.row.job_id)
        for i in range(max(1, self.config.workers)):
            thread = threading.Thread(target=self._worker_loop, name=f"job-worker-{i}",
                                      daemon=True)
            thread.start()
            self._workers.append(thread)
        self._janitor.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking work; running jobs stop at once and stay resumable (not CANCELLED)."""
        with self._lock:
            self._closing = True
            for job in self._jobs.values():
                if job.row.state not in TERMINAL_STATES:
                    job.cancel_reason = "shutdown"
                    job.cancel.set()
                for sink in job.subscribers:
                    sink.put(WATCH_SHUTDOWN)
        for _ in self._workers:
            self._pending.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._janitor_stop.set()

    @property
    def closing(self) -> bool:
        return self._closing

    # --- requests ---------------------------------------------------------------------------

    def new_job_id(self) -> str:
        return uuid.uuid4().hex

    def job_dir(self, job_id: str) -> Path:
        return self.files.job_dir(job_id)

    @staticmethod
    def _request_key(client: str, request_id: str) -> str:
        # request_ids are the client's own namespace: another client's id never matches.
        return f"{client}\n{request_id}"

    def existing_for_request(self, request_id: str, client: str, source: Source,
                             options: pb.TranscriptionOptions) -> pb.Job | None:
        """The job this request_id made before (a retry), or None; ALREADY_EXISTS when the id
        was used for a different request."""
        with self._lock:
            key = self._request_key(client, request_id)
            job_id = self._by_request.get(key) if request_id else None
            if not job_id:
                return None
            earlier = self._jobs[job_id].row
            if not _same_request(earlier, source, options):
                raise JobError(grpc.StatusCode.ALREADY_EXISTS, (
                    f"request_id {request_id[:100]!r} was already used for another request "
                    f"(job {earlier.job_id}: {earlier.source_kind} {earlier.source[:200]!r}); "
                    "a retry must repeat the request, a new request needs a new id"))
            return self._to_pb(self._jobs[job_id])

    def check_admission(self, client: str) -> None:
        """Refuse new work over the configured queue limits (RESOURCE_EXHAUSTED)."""
        if self._closing:
            raise JobError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry later")
        with self._lock:
            open_jobs = [j for j in self._jobs.values() if j.row.state not in TERMINAL_STATES]
        if len(open_jobs) >= self.config.max_queued_jobs:
            raise exhausted(
                f"too many unfinished jobs on this server ({len(open_jobs)}; limit "
                f"max_queued_jobs={self.config.max_queued_jobs}); retry when some finish"
            )
        mine = sum(1 for j in open_jobs if j.row.client == client)
        if mine >= self.config.max_queued_jobs_per_client:
            raise exhausted(
                f"you have {mine} unfinished jobs (limit max_queued_jobs_per_client="
                f"{self.config.max_queued_jobs_per_client}); wait for some to finish"
            )

    def submit(self, source: Source, options: pb.TranscriptionOptions, *, request_id: str = "",
               client: str = "", job_id: str | None = None, run: bool = True) -> pb.Job:
        key = self._request_key(client, request_id)
        with self._lock:
            if request_id and key in self._by_request:  # a retry that raced the first call
                return self._to_pb(self._jobs[self._by_request[key]])
            if self._engine is not None:  # else the job fails with the same error when it runs
                check_model_options(options, self._engine.is_multilingual)
            self.check_admission(client)
            now = time.time()
            row = JobRow(
                job_id=job_id or self.new_job_id(),
                seq=self.store.next_seq(),
                request_id=request_id or None,
                client=client,
                source_kind=source.kind,
                source=source.value,
                media_path=source.media_path,
                options=options,
                state=pb.JOB_STATE_QUEUED,
                created=now,
                updated=now,
            )
            self.store.insert_job(row)
            job = _Job(row=row)
            self._jobs[row.job_id] = job
            if request_id:
                self._by_request[key] = row.job_id
            self._emit_progress(job, pb.JOB_STATE_QUEUED, force=True, message="queued")
            self._publish_state_counts()
        if run:  # a live session's job is fed by its stream, not run by a worker
            self._enqueue(row.job_id)
        log.info("job %s queued: %s %s", row.job_id, source.kind, source.value)
        return self._to_pb(job)

    def get(self, job_id: str, include_result: bool = False, owner: str | None = None
            ) -> pb.Job:
        job = self._find(job_id, owner)
        message = self._to_pb(job)
        if include_result and job.row.state == pb.JOB_STATE_SUCCEEDED:
            stored = self.store.load_job(job_id)  # results live in the store, not in memory
            if stored is not None and stored.result is not None:
                message.result.CopyFrom(stored.result)
        return message

    def list(self, states: Iterable[int], page_size: int, page_token: str,
             owner: str | None = None) -> tuple[list[pb.Job], str]:
        wanted = set(states)
        if page_size < 0:
            raise invalid("page_size must not be negative")
        size = min(page_size or 50, 500)
        try:
            before = int(page_token) if page_token else None
        except ValueError:
            raise invalid(f"page_token {page_token[:100]!r} is not one this server issued"
                          ) from None
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.row.seq, reverse=True)
            selected = [j for j in jobs
                        if (not wanted or j.row.state in wanted)
                        and (owner is None or j.row.client == owner)
                        and (before is None or j.row.seq < before)]
            page = selected[:size]
            token = str(page[-1].row.seq) if len(selected) > size else ""
            return [self._to_pb(j) for j in page], token

    def cancel(self, job_id: str, owner: str | None = None) -> pb.Job:
        job = self._find(job_id, owner)
        with self._lock:
            if job.row.state in TERMINAL_STATES:
                return self._to_pb(job)
            job.cancel_reason = "user"
            job.cancel.set()
            if job.row.state == pb.JOB_STATE_QUEUED:
                # Not started: nothing to stop, so it ends now. A worker that picks it up skips it.
                self._finish(job, pb.JOB_STATE_CANCELLED, Cancelled("cancelled before it started"))
        return self._to_pb(job)

    def subscribe(self, job_id: str, from_index: int, sink: EventSink,
                  owner: str | None = None) -> Subscription:
        """Start watching a job: events from `replay_until` on go to `sink`; read the earlier
        ones with `read_events`. Call `unsubscribe` when done, however the watch ends."""
        if from_index < 0:
            raise invalid("from_index must be 0 or more")
        job = self._find(job_id, owner)
        with self._lock:
            finished = job.row.state in TERMINAL_STATES
            if not finished:
                job.subscribers.append(sink)
            return Subscription(job_id, sink, job.row.event_count, finished)

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            job = self._jobs.get(subscription.job_id)
            if job is not None and subscription.sink in job.subscribers:
                job.subscribers.remove(subscription.sink)

    def read_events(self, job_id: str, start: int, stop: int) -> list[pb.JobEvent]:
        """Up to EVENT_PAGE logged events with start <= index < stop."""
        return list(itertools.islice(self.store.read_events(job_id, start, stop), EVENT_PAGE))

    def shutting_down_error(self, job_id: str) -> JobError:
        with self._lock:
            count = self._jobs[job_id].row.event_count if job_id in self._jobs else 0
        return JobError(
            grpc.StatusCode.UNAVAILABLE,
            "the server is shutting down; the job will resume when it restarts: "
            f"call WatchJob again with from_index={count}",
        )

    # --- the worker -------------------------------------------------------------------------

    def _enqueue(self, job_id: str) -> None:
        """Queue a job for a worker, unless it is queued or running already."""
        with self._lock:
            if job_id in self._queued:
                log.warning("job %s is queued or running already; not queued again", job_id)
                return
            self._queued.add(job_id)
        self._pending.put(job_id)

    def _worker_loop(self) -> None:
        while True:
            job_id = self._pending.get()
            if job_id is None or self._closing:
                return
            try:
                job = self._jobs.get(job_id)
                if job is not None and job.row.state not in TERMINAL_STATES:
                    self._run(job)
            finally:
                with self._lock:
                    self._queued.discard(job_id)

    def _run(self, job: _Job) -> None:
        job_id = job.row.job_id
        started = job.started_at = time.monotonic()
        job.progress.restart()
        metrics.observe_job_started(time.time() - job.row.created)
        ctx = JobContext(
            row=job.row,
            config=self.config,
            engine=self._engine,
            store=self.store,
            job_dir=self.files.job_dir(job_id),
            tmp_dir=self.files.scratch_dir(job_id),
            cancel=job.cancel,
            set_phase=lambda phase, **kw: self._emit_progress(job, phase, force=True, **kw),
            progress=lambda phase, **kw: self._emit_progress(job, phase, **kw),
            window_done=lambda window: self._window_done(job, window),
            update=lambda **fields: self._update(job, **fields),
        )
        try:
            result = self._runner(ctx)
        except Cancelled as exc:
            if job.cancel_reason == "shutdown":
                log.info("job %s stopped by shutdown; it resumes on restart", job_id)
                return
            self._finish(job, pb.JOB_STATE_CANCELLED, exc)
        except JobError as exc:
            log.info("job %s failed: %s %s", job_id, exc.code.name, exc.message)
            self._finish(job, pb.JOB_STATE_FAILED, exc)
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not kill the worker
            log.exception("job %s failed with an internal error", job_id)
            self._finish(job, pb.JOB_STATE_FAILED,
                         JobError(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}"))
        else:
            self._finish(job, pb.JOB_STATE_SUCCEEDED, None, result)
            log.info("job %s succeeded in %.1f s", job_id, time.monotonic() - started)
        finally:
            self.files.remove_scratch(job_id)
            memory.release_free_memory()

    # --- events -----------------------------------------------------------------------------

    def _emit(self, job: _Job, **payload: Any) -> pb.JobEvent:
        with self._lock:
            event = self._new_event(job, 0, **payload)
            self.store.append_event(event)
            self._publish(job, [event])
            return event

    def _new_event(self, job: _Job, offset: int, **payload: Any) -> pb.JobEvent:
        return pb.JobEvent(index=job.row.event_count + offset, job_id=job.row.job_id,
                           time=timestamp(), state=job.row.state, **payload)

    def _publish(self, job: _Job, events: list[pb.JobEvent]) -> None:
        job.row.event_count += len(events)
        for sink in job.subscribers:
            for event in events:
                sink.put(event)

    def _window_done(self, job: _Job, window: StoredWindow) -> None:
        """A finished window and its segment events, stored in one transaction: a crash can
        neither lose a window's events nor make a resumed job send them twice."""
        with self._lock:
            events = [self._new_event(job, i, segment=seg)
                      for i, seg in enumerate(window.segments)]
            self.store.commit_window(job.row.job_id, window, events)
            self._publish(job, events)

    def _emit_progress(self, job: _Job, phase: int, *, force: bool = False,
                       **fields: Any) -> None:
        with self._lock:
            if job.row.state in TERMINAL_STATES:
                return
            admitted = job.progress.admit(phase, fields.pop("percent", 0.0), job.row.state, force)
            if admitted is None:
                return
            phase, percent = admitted
            progress = pb.Progress(phase=phase, percent=percent, **fields)
            if phase != job.row.state:
                job.row.state = phase
                self._publish_state_counts()
            job.row.progress = progress
            job.row.updated = time.time()
            self.store.update_job(job.row.job_id, state=phase, progress=progress,
                                  updated=job.row.updated)
            self._emit(job, progress=progress)

    def _update(self, job: _Job, **fields: Any) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(job.row, name, value)
            self.store.update_job(job.row.job_id, **fields)

    def _finish(self, job: _Job, state: int, error: JobError | None,
                result: pb.Result | None = None) -> None:
        with self._lock:
            if job.row.state in TERMINAL_STATES:
                return
            now = time.time()
            job.row.state = state
            job.row.finished = job.row.updated = now
            fields: dict[str, Any] = {"state": state, "finished": now, "updated": now}
            if error is not None:
                job.row.error_code = error.code.value[0]
                job.row.error_message = error.message
                error = JobError(error.code, redact_paths(
                    error.message, (self.config.data_dir, self.config.media_root)))
                job.row.error_message = error.message
                fields.update(error_code=job.row.error_code, error_message=error.message)
            if result is not None:
                fields["result"] = result
                if job.row.progress is not None:
                    job.row.progress.percent = 100.0
                    job.row.progress.phase = state
                    fields["progress"] = job.row.progress
            self.store.update_job(job.row.job_id, **fields)
            if result is not None:
                self._emit(job, result=result)
            else:
                assert error is not None
                self._emit(job, error=error_message(error.code, error.message))
            job.subscribers.clear()
            self._publish_state_counts()
        metrics.observe_job_finished(
            pb.JobState.Name(state).removeprefix("JOB_STATE_").lower(),
            time.monotonic() - job.started_at if job.started_at is not None else 0.0,
            error.code.name if error is not None and state == pb.JOB_STATE_FAILED else "")
        # Media is kept until the job ends (so a restart can resume); then it goes.
        self.files.remove(job.row.job_id)

    # --- live sessions (service/live/): jobs fed by a TranscribeLive stream ------------------

    def open_live(self, source: Source, options: pb.TranscriptionOptions, *, client: str
                  ) -> pb.Job:
        """A job for a live session: TRANSCRIBING at once, never queued for a worker (a
        restart resumes it through run_pipeline, which ends it with its stored finals)."""
        job = self.submit(source, options, client=client, run=False)
        self._emit_progress(self._find(job.job_id), pb.JOB_STATE_TRANSCRIBING, force=True,
                            message="live")
        return self._to_pb(self._find(job.job_id))

    def live_window(self, job_id: str, window: StoredWindow) -> None:
        """A live final: stored with its segment events, like a finished window."""
        self._window_done(self._find(job_id), window)

    def finish_live(self, job_id: str, result: pb.Result | None, error: JobError | None
                    ) -> None:
        job = self._find(job_id)
        if result is not None:
            self._update(job, duration=result.duration_seconds)
        state = (pb.JOB_STATE_SUCCEEDED if error is None else pb.JOB_STATE_CANCELLED
                 if isinstance(error, Cancelled) else pb.JOB_STATE_FAILED)
        self._finish(job, state, error, result)

    # --- helpers ----------------------------------------------------------------------------

    def _find(self, job_id: str, owner: str | None = None) -> _Job:
        """The job; with `owner`, only that client's (another client's job is NOT_FOUND, the
        same answer as for no job, so ids cannot be probed)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or (owner is not None and job.row.client != owner):
            raise JobError(grpc.StatusCode.NOT_FOUND, f"no job with id {job_id[:100]!r}")
        return job

    def _to_pb(self, job: _Job) -> pb.Job:
        return job_message(job.row)

    def _publish_state_counts(self) -> None:
        counts: dict[str, int] = {pb.JobState.Name(s): 0 for s in pb.JobState.values()}
        for job in self._jobs.values():
            counts[pb.JobState.Name(job.row.state)] += 1
        metrics.set_jobs_by_state(counts)

    def _holds_files(self, job_id: str) -> bool:
        """Whether a job's media must stay: it is unfinished, so a restart resumes it."""
        job = self._jobs.get(job_id)
        return job is not None and job.row.state not in TERMINAL_STATES

    def _janitor_loop(self) -> None:
        """Expire finished jobs (rows, events, files) after the retention period."""
        # Check a few times per retention period, but at most once a minute.
        interval = min(60.0, max(0.5, self.config.retention_hours * 3600.0 / 4))
        while not self._janitor_stop.wait(interval):
            self.expire_finished()

    def expire_finished(self, now: float | None = None) -> int:
        cutoff = (now or time.time()) - self.config.retention_hours * 3600.0
        with self._lock:
            expired = [j for j in self._jobs.values()
                       if j.row.state in TERMINAL_STATES and (j.row.finished or 0) < cutoff]
            for job in expired:
                del self._jobs[job.row.job_id]
                if job.row.request_id:
                    self._by_request.pop(self._request_key(job.row.client, job.row.request_id),
                                         None)
        for job in expired:
            self.store.delete_job(job.row.job_id)
            self.files.remove(job.row.job_id)
        if expired:
            log.info("expired %d finished jobs", len(expired))
            self._publish_state_counts()
        return len(expired)


"""The transcription engine: one worker thread owns the model and decodes windows from every
running job in shared batches (cross-job batching), with whisper's per-window fallback.

Each `transcribe()` call is a job: a feeder thread pulls its windows lazily into a bounded
per-job queue (backpressure to the segmenter and the decoder behind it); the worker takes windows
round-robin across jobs, encodes and decodes them together through a `Backend` (the `torch` or
`ct2` batch decoder), re-queues the windows whose result whisper would reject at the next
temperature, decodes again the speech a window's decode left out, and hands finished window
results back to the job, which yields them in window order.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
from whisper import timing
from whisper.audio import HOP_LENGTH, N_SAMPLES
from whisper.tokenizer import Tokenizer, get_tokenizer

from . import metrics
from .decoding import SAMPLES_PER_TOKEN, compression_ratio
from .engine_align import (
    MIN_PAUSE,
    Piece,
    assign_words,
    pauses,
    place_words,
    split_at_pauses,
    split_at_sentences,
)
from .errors import Cancelled, JobError
from .recovery import anomalous, trim_overlap, uncovered_speech
from .transcriber import (
    SAMPLE_RATE,
    DecodeOptions,
    SegmentResult,
    WindowResult,
    WordResult,
    transcript_text,
)

__all__ = ["Backend", "DecodeOptions", "Engine", "SegmentResult", "WindowResult", "WordResult",
           "transcript_text"]

MAX_CONTINUATIONS = 8  # re-decodes of one window's unconsumed tail (whisper's "seek")
MIN_TAIL_SAMPLES = SAMPLE_RATE  # a shorter unconsumed tail is not worth another decode
PROGRESS_EVERY = 1.0  # seconds between in-batch progress estimates per job
GROW_AFTER = 8  # batches that fit before an out-of-memory-halved batch size doubles again
LINGER_SHARE = 0.25  # of a full batch's time, the longest a batch waits for windows still coming
# Graceful degradation: when the queued windows hold more than `degrade_after` seconds of the
# engine's work (or a batch ran out of memory), the engine does less per window, one step at a
# time, and undoes the steps once the queue is under a third of that. Audio is never dropped.
DEGRADATION_STEPS = (
    "full",
    "no temperature fallback",  # a failed decode is kept at its temperature, not retried
    "smaller beam",  # half the beam (backends with beam search; skipped on greedy ones)
    "no word alignment",  # segments without word times (the costliest per-row step)
)
NO_FALLBACK, SMALLER_BEAM, NO_ALIGNMENT = (DEGRADATION_STEPS.index(name) for name in (
    "no temperature fallback", "smaller beam", "no word alignment"))
DEGRADE_AFTER = 120.0  # seconds of queued work that take a step down (two batch jobs' bounded
# feeds on a loaded 2-core CPU stay under it: backpressure is not overload)
DEGRADE_DWELL = 10.0  # seconds at a step before the next change (no flapping)


class DecodedRow(Protocol):
    """One decoded window (or part of one) as a backend returns it."""

    tokens: list[int]  # sampled tokens, timestamps included, no sot prefix, no eot
    no_speech_prob: float
    looped: bool  # stopped by a repetition guard

    @property
    def avg_logprob(self) -> float: ...


class Backend(Protocol):
    """A batch decoder: what differs between engines."""

    name: str
    is_multilingual: bool
    num_languages: int
    text_ctx: int
    default_batch_size: int
    tokenizer: Tokenizer

    def describe(self) -> str: ...

    def warm_up(self) -> None: ...

    def on_worker_thread(self, threads: int | None) -> None: ...

    def encode(self, audio: Sequence[np.ndarray],
               progress: Callable[[float], None] | None = None) -> Any: ...

    def detect_language(self, features: Any, rows: list[int]) -> list[str]: ...

    # batch_invariant: each row's result must not depend on the other rows of the batch (the
    # same audio, the same text and log-probabilities, whatever shares its batch); False:
    # fastest for these rows (an engine may ignore it); greedy: no beam search, whatever the
    # engine's beam (live audio, where a beam costs latency)
    def decode(self, features: Any, initial: list[list[int]], temperatures: Sequence[float], *,
               sot_index: int, should_stop: Callable[[], bool],
               seeds: Sequence[int] | None = None,
               batch_invariant: bool = True, greedy: bool = False) -> Sequence[DecodedRow]: ...

    def align(self, features: Any, index: int, row: Any, text_tokens: list[int],
              num_frames: int) -> tuple[list[timing.WordTiming], list[float]]: ...

    def is_out_of_memory(self, error: BaseException) -> bool: ...

    def is_fatal(self, error: BaseException) -> bool: ...  # the device cannot go on

    def after_batch(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class EngineStats:
    windows: int = 0  # windows finished
    rows: int = 0  # decoded rows (a window, a fallback retry or a continuation)
    batches: int = 0
    mixed_job_batches: int = 0  # batches holding windows of more than one job
    fallbacks: int = 0  # rows re-queued at a higher temperature
    continuations: int = 0  # rows re-decoding the unconsumed tail of a window
    recoveries: int = 0  # rows decoding speech that no segment of its window covered
    degradation: int = 0  # the step of DEGRADATION_STEPS the engine is at now
    max_degradation: int = 0  # the deepest step taken
    degradation_steps: int = 0  # steps taken, down and up
    oom_splits: int = 0  # batches halved after a CUDA out-of-memory
    preemptions: int = 0  # batches run inside a running batch for jobs that had no row in it
    encode_s: float = 0.0  # worker seconds in log-mel + encoder
    decode_s: float = 0.0  # worker seconds in the decode loop
    align_s: float = 0.0  # worker seconds judging rows and aligning words


class _WindowState:
    def __init__(self, window: Any, prefix: list[int]) -> None:
        self.window = window
        self.prefix = prefix  # forced tokens after the start sequence (Window.prefix)
        self.segments: list[SegmentResult] = []
        self.language = "en"
        self.outstanding = 1  # rows still to decode for this window
        self.continuations = 0
        self.recovered = False  # uncovered speech already given its own decode

    @property
    def done(self) -> bool:
        return self.outstanding == 0

    def result(self) -> WindowResult:
        w = self.window
        start = w.start_sample / SAMPLE_RATE
        end = (w.start_sample + len(w.samples)) / SAMPLE_RATE
        segs = sorted(self.segments, key=lambda s: s.start)
        return WindowResult(int(w.index), start, end, segs, self.language)


@dataclass
class _Outcome:
    retry: bool = False
    segments: list[SegmentResult] = field(default_factory=list)
    continue_at: int | None = None  # samples into the window where a re-decode starts


@dataclass
class _Item:
    job: _Job
    state: _WindowState
    offset: int = 0  # samples into the window where this decode starts
    temp_index: int = 0
    stop: int | None = None  # samples into the window where it stops (None: the window's end)
    recovery: bool = False  # decodes speech that the window's own decode left uncovered

    @property
    def end(self) -> int:
        return len(self.state.window.samples) if self.stop is None else self.stop

    @property
    def prefix(self) -> list[int]:
        """The forced tokens, for the decode that starts at the window's start."""
        return self.state.prefix if self.offset == 0 and not self.recovery else []


@dataclass(eq=False)
class _Job:
    options: DecodeOptions
    cancel: threading.Event
    prompt: list[int]
    max_pending: int
    pending: deque[_Item] = field(default_factory=deque)
    order: deque[_WindowState] = field(default_factory=deque)
    queued: int = 0  # windows taken from the feeder and not yet finished
    feed_done: bool = False
    closed: bool = False
    error: BaseException | None = None
    # called from the worker while a batch holding this job's windows runs, with an estimate
    # of how far (absolute seconds) the job has got: a batch can take many seconds on a CPU
    on_progress: Callable[[float], None] | None = None
    reported_at: float = 0.0
    priority: int = 0  # higher: its windows are taken first when a batch is formed
    served: int = 0  # rows taken into batches so far: the least-served job goes first

    @property
    def dead(self) -> bool:
        return self.closed or self.cancel.is_set() or self.error is not None


class Engine:
    """Shares one model between all jobs; see the module docstring."""

    def __init__(self, backend: Any, *, batch_size: int | None = None,
                 threads: int | None = None, linger: float = 0.25,
                 max_linger: float = 2.0, degrade_after: float | None = DEGRADE_AFTER,
                 degrade_dwell: float = DEGRADE_DWELL, timestamp_tokens: bool = True) -> None:
        from .torch_backend import as_backend

        self.backend: Backend = as_backend(backend)  # a whisper model runs on the torch backend
        self.name = self.backend.name
        self.is_multilingual = self.backend.is_multilingual
        # whether a window's prefix (Window.prefix) is forced into its decode
        self.accepts_prefix = bool(getattr(self.backend, "accepts_prefix", False))
        # False: decode text only (<|notimestamps|>); segments are cut at the speech detector's
        # pauses and at sentence ends, bounded by the aligned words
        self.timestamp_tokens = timestamp_tokens
        self.batch_size = batch_size or self.backend.default_batch_size
        self.max_batch_size = self.batch_size
        self.threads = threads
        # a batch is held open while windows keep arriving (a gap of `linger` s ends the wait,
        # `max_linger` s caps it): small batches cost nearly as much per step as full ones
        self.linger = linger
        self.max_linger = max_linger
        self._fitted = 0  # batches decoded since the last out-of-memory halving
        self.degrade_after = degrade_after  # None: never degrade
        self.degrade_dwell = degrade_dwell
        self._row_seconds = 0.0  # moving average of worker seconds per decoded row
        self._level_since = time.monotonic()
        # the steps this backend has: "smaller beam" only where there is a beam to shrink
        self._steps = [i for i in range(len(DEGRADATION_STEPS))
                       if i != SMALLER_BEAM or getattr(self.backend, "beam_size", 1) > 1]
        self._arrivals = 0  # windows fed so far, all jobs: tells the linger that feeders move
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._jobs: list[_Job] = []
        self._nested = False  # worker only: a preempting batch is running inside another
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._tokenizer = self.backend.tokenizer
        # set once the backend failed beyond recovery (a dead CUDA context): the engine stops,
        # every job fails with this message, and `on_failure(message)` is called (the server
        # sets its health NOT_SERVING)
        self.failure: str | None = None
        self.on_failure: Callable[[str], None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._worker is not None:
                return
            self._stopping = False
            ready: Future[None] = Future()
            self._worker = threading.Thread(target=self._run, args=(ready,),
                                            name="engine-worker", daemon=True)
            self._worker.start()
        try:
            ready.result()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.join(timeout)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._stopping and self.failure is None

    @property
    def degradation(self) -> int:
        return self.stats.degradation

    @property
    def degradation_message(self) -> str:
        """For a job's progress message: '' at full service, else the step taken."""
        level = self.stats.degradation
        return "" if level == 0 else f"engine overloaded: {DEGRADATION_STEPS[level]}"

    def _adjust_degradation(self, *, short_of_memory: bool = False) -> None:
        """With the lock held: one step down when the queued work is over `degrade_after`
        seconds (or memory ran short), one up when it is under a third of that; at most one
        change per `degrade_dwell` seconds except for memory."""
        if self.degrade_after is None:
            return
        now = time.monotonic()
        at = self._steps.index(self.stats.degradation)
        queued = self._row_seconds * sum(len(j.pending) for j in self._jobs if not j.dead)
        if short_of_memory or (queued > self.degrade_after
                               and now - self._level_since >= self.degrade_dwell):
            if at + 1 < len(self._steps):
                self._set_degradation(self._steps[at + 1], "down", now)
        elif (at > 0 and queued < self.degrade_after / 3
              and now - self._level_since >= self.degrade_dwell):
            self._set_degradation(self._steps[at - 1], "up", now)

    def _set_degradation(self, level: int, direction: str, now: float) -> None:
        self.stats.degradation = level
        self.stats.max_degradation = max(self.stats.max_degradation, level)
        self.stats.degradation_steps += 1
        self._level_since = now
        reduce_beam = getattr(self.backend, "reduce_beam", None)
        if reduce_beam is not None:
            reduce_beam(level >= SMALLER_BEAM)
        metrics.set_engine_degradation(level, direction)

    def idle(self) -> bool:
        """No job has a window queued or in a batch."""
        with self._cv:
            return not any(j.queued for j in self._jobs if not j.dead)

    def stats_snapshot(self) -> EngineStats:
        with self._cv:
            return EngineStats(**vars(self.stats))

    # --- the job side ----------------------------------------------------------------------------
    def transcribe(self, windows: Iterable[Any], options: DecodeOptions,
                   cancel: threading.Event, *,
                   progress: Callable[[float], None] | None = None,
                   priority: int = 0) -> Iterator[WindowResult]:
        """Window results in window order. Raises errors.Cancelled soon after `cancel` is set.
        `progress(seconds)`: while a batch runs, about every PROGRESS_EVERY s, an estimate of
        the audio position the job has reached (from the worker thread). `priority`: a batch
        is filled from the jobs of the highest priority with windows waiting first (live audio
        passes a higher one than batch jobs' 0); within a priority the least-served job's
        windows go first. A batch of prioritised rows only is decoded for latency, not batch
        invariance (see Backend.decode): a live final of one row takes about half the time."""
        if self.failure is not None:
            raise JobError(grpc.StatusCode.UNAVAILABLE, self.failure)
        if not self.running:
            raise JobError(grpc.StatusCode.UNAVAILABLE, "the transcription engine is not running")
        if not options.temperatures:
            raise JobError(grpc.StatusCode.INVALID_ARGUMENT, "at least one temperature is needed")
        if options.task not in ("transcribe", "translate"):
            raise JobError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"unknown task {options.task!r}: use 'transcribe' or 'translate'")
        prompt: list[int] = []
        if options.initial_prompt:
            text = " " + options.initial_prompt.strip()
            # whisper keeps at most half the text context for the prompt
            prompt = self._tokenizer.encode(text)[-(self.backend.text_ctx // 2 - 1):]
        job = _Job(options, cancel, prompt, max_pending=max(2 * self.batch_size, 4),
                   on_progress=progress, priority=priority)
        return self._results(job, iter(windows))

    def _results(self, job: _Job, windows: Iterator[Any]) -> Iterator[WindowResult]:
        with self._cv:
            self._jobs.append(job)
        feeder = threading.Thread(target=self._feed, args=(job, windows), name="engine-feeder",
                                  daemon=True)
        feeder.start()
        try:
            while True:
                with self._cv:
                    while True:
                        if job.cancel.is_set():
                            raise Cancelled()
                        if job.error is not None:
                            raise job.error
                        if job.order and job.order[0].done:
                            state = job.order.popleft()
                            break
                        if job.feed_done and not job.order:
                            return
                        if not self.running:
                            raise JobError(grpc.StatusCode.UNAVAILABLE, self.failure or
                                           "the server is shutting down; submit the job again")
                        self._cv.wait(0.1)
                yield state.result()
        finally:
            with self._cv:
                job.closed = True
                job.pending.clear()
                if job in self._jobs:
                    self._jobs.remove(job)
                self._cv.notify_all()

    def _feed(self, job: _Job, windows: Iterator[Any]) -> None:
        try:
            for window in windows:
                with self._cv:
                    while job.queued >= job.max_pending and not job.dead:
                        self._cv.wait(0.1)
                    if job.dead:
                        return
                    state = _WindowState(window, self._prefix_tokens(window))
                    job.order.append(state)
                    job.pending.append(_Item(job, state))
                    job.queued += 1
                    self._arrivals += 1
                    self._cv.notify_all()
        except JobError as e:
            job.error = e
        except Exception as e:  # a decoder or segmenter bug must not hang the job
            job.error = JobError(grpc.StatusCode.INTERNAL, f"reading the audio failed: {e}")
        finally:
            with self._cv:
                job.feed_done = True
                self._cv.notify_all()

    # --- the worker side -------------------------------------------------------------------------
    def _run(self, ready: Future[None]) -> None:
        # the warm-up runs here too: the worker is the one thread with torch's thread pool
        # (see torch_threads), and its kernels are built on the thread that uses them
        try:
            self.backend.on_worker_thread(self.threads)
            self.backend.warm_up()
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(None)
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._process(batch)

    def _take_batch(self) -> list[_Item] | None:
        """Up to batch_size items, least-served jobs first; None when stopping."""
        with self._cv:
            while True:
                if self._stopping:
                    return None
                live = [j for j in self._jobs if not j.dead and j.pending]
                if live:
                    break
                self._adjust_degradation()  # idle: the steps come back up
                self._cv.wait(0.2)
            self._adjust_degradation()
            if len(self._newcomers(live)) == len(live):
                self._linger()  # nobody is bypassed: let the batch fill
            live = [j for j in self._jobs if not j.dead and j.pending]
            return self._fill(self._newcomers(live), self.batch_size)

    def _newcomers(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs that have not yet had a batch's worth of rows, when some have (else all):
        a newcomer's first windows go into a batch of their own instead of one filled with a
        long job's windows, which would make the short job wait a whole full batch. Each job
        gets this only for its first batch_size rows, so newcomers cannot starve a long job
        unless they arrive faster than the engine serves them."""
        fresh = [j for j in jobs if j.served < self.batch_size]
        return fresh or jobs

    def _fill(self, jobs: list[_Job], limit: int) -> list[_Item]:
        """With the lock held: up to `limit` items from `jobs`. Highest priority first; within
        a priority the job that has had the fewest rows decoded goes first, one window per job
        per turn, so a short job's windows lead the next batch instead of queuing behind a long
        job's, and jobs that arrive together still share batches (cross-job batching)."""
        if not jobs:
            return []
        order = sorted(jobs, key=lambda j: (-j.priority, j.served))
        key = self._key(order[0].pending[0])
        batch: list[_Item] = []
        for level in sorted({j.priority for j in order}, reverse=True):
            turn = [j for j in order if j.priority == level]
            while len(batch) < limit:
                took = False
                for job in turn:
                    if job.pending and len(batch) < limit:
                        if self._key(job.pending[0]) != key:
                            continue
                        batch.append(job.pending.popleft())
                        job.served += 1
                        took = True
                if not took:
                    break
        return batch

    def _preempt(self, running: list[_Item], budget: list[int]) -> None:
        """A safe point inside a running batch (worker thread, lock not held): windows of jobs
        that have no row in it (they arrived after it was formed), or of a higher priority, are
        decoded now in a batch of their own, while the running batch waits. A CPU batch of
        16 windows runs for many seconds; without this a short job waits for all of it, then
        shares the next one. One level deep, and at most `budget[0]` rows per running batch, so
        a long job arriving cannot stall the running batch for longer than one batch."""
        if self._nested or budget[0] <= 0 or self._stopping:
            return
        inside = {id(it.job) for it in running}
        top = max(it.job.priority for it in running)
        with self._cv:
            waiting = [j for j in self._jobs if not j.dead and j.pending
                       and (j.priority > top or (id(j) not in inside and j.priority >= top))]
            batch = self._fill(self._newcomers(waiting), budget[0])
            if batch:
                self.stats.preemptions += 1
        if not batch:
            return
        budget[0] -= len(batch)
        self._nested = True
        try:
            self._process(batch)
        finally:
            self._nested = False

    def _linger(self) -> None:
        """With the lock held: wait while the batch is short and feeders keep adding windows.
        A feeder that decodes faster than the engine transcribes (the common case: ffmpeg and
        the VAD run at hundreds of times real time) fills the batch within a fraction of a
        second; a stalled one (a slow download) costs at most `linger` seconds, a trickle at
        most a quarter of a full batch's time."""
        if self.linger <= 0:
            return
        now = time.monotonic()
        # while windows keep coming, wait up to a quarter of what a full batch takes: a batch
        # cut short leaves windows for one more pass, which costs nearly a whole batch's steps
        cap = max(self.max_linger, LINGER_SHARE * self._row_seconds * self.batch_size)
        deadline, quiet_since, seen = now + cap, now, self._arrivals
        while not self._stopping:
            alive = [j for j in self._jobs if not j.dead]
            waiting = sum(len(j.pending) for j in alive)
            if waiting >= self.batch_size or all(j.feed_done for j in alive):
                return
            now = time.monotonic()
            if self._arrivals != seen:
                seen, quiet_since = self._arrivals, now
            elif now - quiet_since >= self.linger:
                return
            if now >= deadline:
                return
            self._cv.wait(min(quiet_since + self.linger, deadline) - now)

    def _key(self, item: _Item) -> tuple[Any, ...]:
        # rows of one batch need initial token sequences of one length
        return (len(item.job.prompt), len(item.prefix))

    def _process(self, items: list[_Item]) -> None:
        out_of_memory = False
        try:
            self._decode(items)
        except Exception as e:
            if self.backend.is_out_of_memory(e):
                out_of_memory = True
            elif self.backend.is_fatal(e):
                self._fail_engine(e)
            else:
                self._fail({id(i.job): i.job for i in items}.values(),
                           JobError(grpc.StatusCode.INTERNAL, f"decoding failed: {e}"))
        finally:
            # after the except block: the failed batch's tensors (held by the exception's
            # traceback) are already freed, so the cache really empties before a retry
            self.backend.after_batch()
        if not out_of_memory:
            self._grow_back()
            return
        if len(items) == 1:
            self._fail([items[0].job], JobError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "out of GPU memory decoding a single window; free GPU memory or use a "
                "smaller model"))
            return
        with self._cv:
            self.stats.oom_splits += 1
            self._fitted = 0
            self._adjust_degradation(short_of_memory=True)
        half = len(items) // 2
        self.batch_size = max(1, min(self.batch_size, half))
        self._process(items[:half])
        self._process(items[half:])

    def _grow_back(self) -> None:
        """After an out-of-memory halving, double the batch again once it has gone through
        GROW_AFTER batches: the memory pressure may have been another process's, or a peak."""
        if self.batch_size >= self.max_batch_size:
            return
        self._fitted += 1
        if self._fitted >= GROW_AFTER:
            self._fitted = 0
            self.batch_size = min(self.max_batch_size, self.batch_size * 2)

    def _fail_engine(self, error: BaseException) -> None:
        """The backend cannot decode any more (its device context is gone): fail every job and
        stop taking work; only a restart recovers."""
        with self._cv:
            if self.failure is not None:
                return
            self.failure = (f"the transcription engine failed and cannot recover "
                            f"({type(error).__name__}: {str(error)[:200]}); the server needs a "
                            "restart, then submit the job again")
            self._stopping = True
            for job in self._jobs:
                if job.error is None:
                    job.error = JobError(grpc.StatusCode.UNAVAILABLE, self.failure)
            self._cv.notify_all()
        if self.on_failure is not None:
            self.on_failure(self.failure)

    def _fail(self, jobs: Iterable[_Job], error: JobError) -> None:
        with self._cv:
            for job in jobs:
                if job.error is None:
                    job.error = error
            self._cv.notify_all()

    def _prefix_tokens(self, window: Any) -> list[int]:
        """A window's prefix as the text of a segment that starts with the window."""
        text = getattr(window, "prefix", "").strip()
        if not text or not self.accepts_prefix:
            return []
        start = [self._tokenizer.timestamp_begin] if self.timestamp_tokens else []
        return [*start, *self._tokenizer.encode(" " + text)]

    def _initial_tokens(self, job: _Job, language: str) -> list[int]:
        if self.is_multilingual:
            tok = get_tokenizer(True, num_languages=self.backend.num_languages,
                                language=language, task=job.options.task)
        else:
            tok = self._tokenizer
        initial = list(tok.sot_sequence)
        if job.prompt:
            initial = [tok.sot_prev] + job.prompt + initial
        if not self.timestamp_tokens:
            initial.append(tok.no_timestamps)
        return initial

    def _decode(self, items: list[_Item]) -> None:
        bd = self.backend
        audio = [it.state.window.samples[it.offset:it.end] for it in items]
        report = self._progress_reporter(items)
        report(0.0)
        budget = [self.batch_size]  # rows that preempting batches may take from this one
        paused = [0.0]  # seconds spent in preempting batches (their own stats count them)

        def safe_point() -> None:
            t = time.perf_counter()
            self._preempt(items, budget)
            paused[0] += time.perf_counter() - t

        jobs = [it.job for it in items]

        def encoded(fraction: float) -> None:
            report(0.3 * fraction)
            safe_point()
            if all(j.dead for j in jobs):
                raise _Abandoned  # cancelled (a partial a final replaces): stop encoding

        t0 = time.perf_counter()
        try:
            features = bd.encode(audio, encoded)
        except _Abandoned:
            return
        report(0.3)
        safe_point()
        if all(j.dead for j in jobs):
            return
        t1, paused_encode = time.perf_counter(), paused[0]
        languages = ["en"] * len(items)
        if self.is_multilingual:
            unknown = [i for i, it in enumerate(items) if not it.job.options.language]
            detected = bd.detect_language(features, unknown)
            for i, lang in zip(unknown, detected, strict=True):
                languages[i] = lang
            for i, it in enumerate(items):
                languages[i] = it.job.options.language or languages[i]
        initial = [self._initial_tokens(it.job, lang) + it.prefix
                   for it, lang in zip(items, languages, strict=True)]
        sot_index = initial[0].index(self._tokenizer.sot)
        temps = [it.job.options.temperatures[it.temp_index] for it in items]
        checks = 0

        def should_stop() -> bool:  # called every few decode steps
            nonlocal checks
            checks += 1
            report(min(0.9, 0.3 + 0.6 * checks / 20))  # most rows end within ~160 steps
            safe_point()
            return all(j.dead for j in jobs)

        # a row sampled at a fallback temperature is seeded from its audio and temperature:
        # the same audio gives the same text in any batch and any run
        seeds = [zlib.crc32(np.ascontiguousarray(a).tobytes(), it.temp_index) if t > 0 else 0
                 for a, it, t in zip(audio, items, temps, strict=True)]
        # a batch of live rows only is decoded for latency: unpadded, and greedy (a beam did not
        # lower live WER, and it added half a second to final latency on 2 CPU cores)
        live_only = all(j.priority > 0 for j in jobs)
        rows = bd.decode(features, initial, temps, sot_index=sot_index, should_stop=should_stop,
                         seeds=seeds, batch_invariant=not live_only, greedy=live_only)
        t2, paused_decode = time.perf_counter(), paused[0]
        # judge rows (and align words) outside the lock; apply the outcomes under it
        outcomes: list[_Outcome | None] = []
        for i, (it, row) in enumerate(zip(items, rows, strict=True)):
            outcomes.append(None if it.job.dead else self._judge(it, row, features, i))
            report(0.9 + 0.1 * (i + 1) / len(items))  # aligning a batch's words takes seconds
            safe_point()
        t3 = time.perf_counter()
        with self._cv:
            self.stats.encode_s += t1 - t0 - paused_encode
            self.stats.decode_s += t2 - t1 - (paused_decode - paused_encode)
            self.stats.align_s += t3 - t2 - (paused[0] - paused_decode)
            self.stats.batches += 1
            self.stats.rows += len(items)
            per_row = (t3 - t0 - paused[0]) / len(items)
            self._row_seconds = (per_row if self._row_seconds == 0.0
                                 else 0.7 * self._row_seconds + 0.3 * per_row)
            if len({id(j) for j in jobs}) > 1:
                self.stats.mixed_job_batches += 1
            for it, outcome, lang in zip(items, outcomes, languages, strict=True):
                if outcome is not None and not it.job.dead:
                    it.state.language = lang
                    self._apply(it, outcome)
            self._cv.notify_all()
        metrics.observe_window_batch(t3 - t0 - paused[0], len(items))

    def _progress_reporter(self, items: list[_Item]) -> Callable[[float], None]:
        """fraction of the batch done (an estimate) → each job's on_progress with the position
        that fraction of its in-flight windows reaches."""
        spans: dict[int, tuple[_Job, float, float]] = {}
        for it in items:
            w = it.state.window
            lo = (w.start_sample + it.offset) / SAMPLE_RATE
            hi = (w.start_sample + it.end) / SAMPLE_RATE
            job, a, b = spans.get(id(it.job), (it.job, lo, hi))
            spans[id(it.job)] = (job, min(a, lo), max(b, hi))

        def report(fraction: float) -> None:
            now = time.monotonic()
            for job, lo, hi in spans.values():
                if job.on_progress is None or job.dead or now - job.reported_at < PROGRESS_EVERY:
                    continue
                job.reported_at = now
                job.on_progress(lo + fraction * (hi - lo))

        return report

    def _judge(self, it: _Item, row: DecodedRow, features: Any, index: int) -> _Outcome:
        """Whisper's fallback rule, then the row's segments and whether its tail needs another
        decode."""
        opts = it.job.options
        text = self._tokenizer.decode([t for t in row.tokens if t < self._tokenizer.eot])
        ratio = compression_ratio(text)
        avg = row.avg_logprob
        failed = row.looped
        max_ratio = opts.compression_ratio_threshold
        if max_ratio is not None and ratio > max_ratio:
            failed = True
        if opts.logprob_threshold is not None and avg < opts.logprob_threshold:
            failed = True
        silence = (opts.no_speech_threshold is not None
                   and row.no_speech_prob > opts.no_speech_threshold
                   and opts.logprob_threshold is not None and avg < opts.logprob_threshold)
        if (failed and not silence and it.temp_index + 1 < len(opts.temperatures)
                and self.stats.degradation < NO_FALLBACK):  # degraded: keep this decode
            return _Outcome(retry=True)
        no_speech = opts.no_speech_threshold
        skip = no_speech is not None and row.no_speech_prob > no_speech
        if skip and opts.logprob_threshold is not None and avg > opts.logprob_threshold:
            skip = False
        if skip:
            return _Outcome()
        temperature = opts.temperatures[it.temp_index]
        segs, consumed = self._segments(it, row, ratio, temperature, features, index)
        window = it.state.window
        tail = it.end - (it.offset + consumed)
        if (consumed > 0 and tail >= MIN_TAIL_SAMPLES
                and it.state.continuations < MAX_CONTINUATIONS
                and _speech_in(window, window.start_sample + it.offset + consumed,
                               window.start_sample + it.end)):
            # the decode stopped before the window's end (whisper would seek there)
            return _Outcome(segments=segs, continue_at=it.offset + consumed)
        return _Outcome(segments=segs)

    def _apply(self, it: _Item, outcome: _Outcome) -> None:
        """Record a row's outcome. Called under the lock."""
        state = it.state
        if outcome.retry:
            self.stats.fallbacks += 1
            it.job.pending.appendleft(_Item(it.job, state, it.offset, it.temp_index + 1,
                                            it.stop, it.recovery))
            return
        segments = outcome.segments
        if it.recovery:
            # a region the VAD calls speech and the decode skipped is often breath or noise:
            # keep only text whose words look like speech (whisper's anomaly rule)
            # (without word alignment there are no words to judge: the text is kept)
            segments = [s for s in trim_overlap(segments, state.segments)
                        if not anomalous(s) or not s.words]
        state.segments.extend(segments)
        if outcome.continue_at is not None:
            state.continuations += 1
            self.stats.continuations += 1
            it.job.pending.appendleft(_Item(it.job, state, outcome.continue_at, 0, it.stop,
                                            it.recovery))
            return
        state.outstanding -= 1
        if state.done and not state.recovered and not it.job.options.draft:
            state.recovered = True
            window = state.window
            for lo, hi in uncovered_speech(window, state.segments):
                # speech the decode skipped (whisper ends a window early, or never starts on a
                # quiet talker after a loud one): decode it alone; whisper's own no-speech and
                # logprob rules still decide whether it is speech
                self.stats.recoveries += 1
                state.outstanding += 1
                it.job.pending.append(_Item(it.job, state, lo - window.start_sample, 0,
                                            hi - window.start_sample, recovery=True))
        if state.done:
            it.job.queued -= 1
            self.stats.windows += 1

    def _segments(self, it: _Item, row: DecodedRow, ratio: float, temperature: float,
                  features: Any, index: int) -> tuple[list[SegmentResult], int]:
        """Split a row's tokens into segments at timestamp pairs, as whisper's transcribe() does,
        then at the pauses the segmenter found. Returns the segments (absolute times) and how
        many samples of the input they consumed."""
        tok = self._tokenizer
        tb = tok.timestamp_begin
        tokens = row.tokens
        window = it.state.window
        base = window.start_sample + it.offset
        limit = window.start_sample + it.end
        available = it.end - it.offset
        is_ts = [t >= tb for t in tokens]
        single_end = is_ts[-2:] == [False, True]
        cuts = [i for i in range(1, len(tokens)) if is_ts[i - 1] and is_ts[i]]
        pieces: list[Piece] = []
        if cuts:
            slices = cuts + ([len(tokens)] if single_end else [])
            last = 0
            for cur in slices:
                part = tokens[last:cur]
                # (text first: it goes on from a forced prefix, which started at the window's start)
                s = (part[0] - tb) * SAMPLES_PER_TOKEN if part[0] >= tb else 0
                e = (part[-1] - tb) * SAMPLES_PER_TOKEN
                pieces.append(Piece(base + s, base + e, part))
                last = cur
            consumed = available if single_end else (tokens[last - 1] - tb) * SAMPLES_PER_TOKEN
        else:
            stamps = [t for t in tokens if t >= tb]
            end = available
            if stamps and stamps[-1] != tb:
                end = (stamps[-1] - tb) * SAMPLES_PER_TOKEN
            pieces.append(Piece(base, base + end, tokens))
            consumed = available
        for p in pieces:
            p.tokens = [t for t in p.tokens if t < tok.eot]
            p.start = min(p.start, limit)
            p.end = min(max(p.end, p.start), limit)
        pieces = [p for p in pieces if p.tokens]
        text_tokens = [t for p in pieces for t in p.tokens]
        text_lp: list[float] = []
        speech = tuple(getattr(window, "speech", ()) or ())
        if text_tokens and (self.stats.degradation >= NO_ALIGNMENT or it.job.options.draft):
            # degraded, or a draft: no word alignment; the decode's own token log-probabilities
            eot = tok.eot
            text_lp = [lp for t, lp in zip(tokens, getattr(row, "token_logprobs", ()) or (),
                                           strict=False) if t < eot]
            if len(text_lp) != len(text_tokens):
                text_lp = []
        elif text_tokens:
            span = min(available, N_SAMPLES)
            if is_ts and is_ts[-1]:
                # the decode closed its text with a timestamp: no words after it (aligning over
                # the rest drags the last words onto audio it never transcribed)
                span = min(span, (tokens[-1] - tb) * SAMPLES_PER_TOKEN + SAMPLE_RATE)
            # a prefix's words are aligned too (the text starts where the audio does), then
            # dropped: they were transcribed before this decode
            lead = [t for t in it.prefix if t < tok.eot]
            aligned, text_lp = self.backend.align(features, index, row, lead + text_tokens,
                                                  max(span // HOP_LENGTH, 2))
            aligned = _after_tokens(aligned, len(lead))
            silences = pauses(speech)
            if aligned and silences and any(p.start + MIN_PAUSE < ps and pe < p.end - MIN_PAUSE
                                            for p in pieces for ps, pe in silences):
                starts = [(w.tokens, w.start) for w in aligned]
                pieces = split_at_pauses(pieces, starts, base, silences, tok)
            assign_words(pieces, place_words(aligned, base, text_lp, speech))
            if not self.timestamp_tokens:
                pieces = split_at_sentences(pieces)
        segs = []
        k = 0
        for p in pieces:
            lps = text_lp[k:k + len(p.tokens)]
            k += len(p.tokens)
            text = tok.decode(p.tokens).strip()
            if not text:
                continue
            words = tuple(WordResult(w.word, round(w.start / SAMPLE_RATE, 3),
                                     round(w.end / SAMPLE_RATE, 3), round(w.probability, 4))
                          for w in p.words)
            segs.append(SegmentResult(
                start=round(p.start / SAMPLE_RATE, 3), end=round(p.end / SAMPLE_RATE, 3),
                text=text, avg_logprob=float(np.mean(lps)) if lps else row.avg_logprob,
                no_speech_prob=row.no_speech_prob, compression_ratio=ratio,
                temperature=temperature, words=words))
        return segs, int(min(consumed, available))


class _Abandoned(Exception):
    """Every job of the batch being encoded is gone."""


def _after_tokens(words: list[Any], count: int) -> list[Any]:
    """The aligned words after the first `count` tokens."""
    seen, out = 0, []
    for w in words:
        if seen >= count:
            out.append(w)
        seen += len(w.tokens)
    return out


def _speech_in(window: Any, from_sample: int, to_sample: int) -> bool:
    """Whether the window holds speech between the two samples (True when it does not say)."""
    spans = getattr(window, "speech", None)
    if not spans:
        return True
    return sum(max(0, min(e, to_sample) - max(s, from_sample)) for s, e in spans) >= MIN_PAUSE
